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
