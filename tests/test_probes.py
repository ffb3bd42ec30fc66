"""Probes are a pure function of (suite, tokenizer, T, N, seed) and carry nothing of the machine."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_tokenizer
from profiler.errors import AttnprofError
from profiler.probes import _render_stdlib_docs, build_probes, split_suite


def test_same_inputs_same_probes_and_seed_changes_them():
    tok = tiny_tokenizer()
    a = build_probes("text:stdlib,random,repeat", tok, 128, 6, seed=3)
    b = build_probes("text:stdlib,random,repeat", tok, 128, 6, seed=3)
    c = build_probes("text:stdlib,random,repeat", tok, 128, 6, seed=4)
    assert np.array_equal(a.input_ids, b.input_ids) and not np.array_equal(a.input_ids, c.input_ids)
    assert a.sources == ("text:stdlib", "random", "repeat") * 2


def test_random_probes_avoid_special_tokens_and_repeat_probes_repeat():
    tok = tiny_tokenizer()
    p = build_probes("random,repeat", tok, 512, 2, seed=0)
    assert not set(p.input_ids[0]) & set(tok.all_special_ids)
    block = p.input_ids[1][:128]
    assert np.array_equal(p.input_ids[1][128:256], block)


def test_stdlib_corpus_carries_no_machine_specific_text():
    """Rendered here (pytest, torch and logging handlers loaded) and in a bare process: same text."""
    import logging
    logging.getLogger("attnprof-test").addHandler(logging.StreamHandler())   # live state pydoc would show
    text = _render_stdlib_docs()
    assert sys.prefix not in text and sys.executable not in text and os.getcwd() not in text
    assert " at 0x7" not in text                                  # object addresses are masked
    other = subprocess.run([sys.executable, "-c", "from profiler.probes import _render_stdlib_docs as r; "
                            "import hashlib; print(hashlib.sha256(r().encode()).hexdigest())"],
                           capture_output=True, text=True, check=True, cwd="/",
                           env={**os.environ, "PYTHONHASHSEED": "7", "ATTNPROF_PROBE_TEST": "x" * 40})
    import hashlib
    assert other.stdout.strip() == hashlib.sha256(text.encode()).hexdigest()


def test_bad_suites():
    with pytest.raises(AttnprofError, match="unknown probe source"):
        build_probes("wikipedia", tiny_tokenizer(), 64, 1, 0)
    with pytest.raises(AttnprofError, match="empty probe suite"):
        split_suite(" , ")


def test_random_probes_avoid_added_special_tokens_too():
    """Reserved tokens added as special (SmolLM2's <repo_name>, <issue_start>...) are not in
    all_special_ids but are special all the same: random probes must not draw them."""
    tok = tiny_tokenizer()
    tok.add_tokens(["<reserved_a>", "<reserved_b>"], special_tokens=True)
    reserved = set(tok.convert_tokens_to_ids(["<reserved_a>", "<reserved_b>"]))
    assert not reserved & set(tok.all_special_ids)
    p = build_probes("random", tok, 4096, 4, seed=0)
    assert not reserved & set(p.input_ids.ravel().tolist())


def test_jsonl_fields_must_be_text(tmp_path):
    """null or a number is not text (it would become "None"); a UTF-8 BOM is not part of the JSON."""
    lines = "\n".join('{"text": "%s"}' % ("word " * 40) for _ in range(20))
    (tmp_path / "bom.jsonl").write_text("\ufeff" + lines, encoding="utf-8")
    assert build_probes(f"jsonl:{tmp_path / 'bom.jsonl'}:text", tiny_tokenizer(), 64, 1, 0).input_ids.shape == (1, 64)
    (tmp_path / "nulls.jsonl").write_text(lines + '\n{"text": null}\n', encoding="utf-8")
    with pytest.raises(AttnprofError, match=r"nulls.jsonl:21: field 'text' is null, not a string"):
        build_probes(f"jsonl:{tmp_path / 'nulls.jsonl'}:text", tiny_tokenizer(), 64, 1, 0)


def test_tokenizers_are_compared_on_the_whole_probe_and_only_there(tmp_path):
    """A tokenizer that differs only late in a probe (lowercasing text that starts 800 tokens in)
    is refused; one that only adds a token the probes never use is not."""
    from tokenizers import normalizers

    from profiler.probes import ProbeSet, tokenizers_agree
    base = tiny_tokenizer()
    lower_part = "the quick brown fox " * 40
    upper_at = len(base(lower_part, add_special_tokens=False)["input_ids"])
    ids = base(lower_part + "THE QUICK BROWN FOX " * 100, add_special_tokens=False)["input_ids"][:1024]
    assert 512 < upper_at < len(ids) == 1024
    probes = ProbeSet("file:late.txt", 1024, 1, 0, np.array([ids]), ("file:late.txt",))
    lower = tiny_tokenizer()
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert "tokenises differently" in tokenizers_agree(base, lower, probes)
    padded = tiny_tokenizer()
    padded.add_tokens(["<pad>"], special_tokens=True)
    assert tokenizers_agree(base, padded, build_probes("random,text:stdlib", base, 256, 4, 0)) is None
