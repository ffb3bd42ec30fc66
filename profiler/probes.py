"""Probes: the token sequences a model is profiled on, fully determined by
(suite, tokenizer, length T, count N, seed).

A suite is one source or several joined with commas ("text:stdlib,random"); probe n comes from
source n mod k, so every source gets its share. Sources:
  random            uniform random token ids (special tokens excluded)
  repeat            a random block repeated (induction-style copying)
  text:stdlib       rendered documentation of Python standard-library modules (real English prose)
  code:stdlib       Python source of standard-library modules
  file:PATH         a plain-text file
  jsonl:PATH:FIELD  the FIELD of every line of a JSON-lines file, joined by blank lines
Real-text probes are windows of the tokenised corpus at seed-determined offsets.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import AttnprofError

DEFAULT_SUITE = "text:stdlib,random"
REPEAT_BLOCK = 128

# A fixed module order makes the corpus reproducible on one Python version.
STDLIB_DOC_MODULES = (
    "os", "re", "json", "collections", "itertools", "functools", "pathlib", "datetime", "string",
    "textwrap", "argparse", "logging", "subprocess", "threading", "typing", "dataclasses", "enum",
    "math", "random", "statistics", "csv", "urllib.parse", "shutil", "tempfile", "glob", "io",
    "pickle", "copy", "heapq", "bisect", "contextlib", "abc", "inspect", "unittest", "decimal",
    "fractions", "hashlib", "struct", "socket", "zipfile", "tarfile", "sqlite3", "html", "calendar",
    "time", "operator", "weakref", "queue", "difflib", "pprint", "traceback", "warnings", "codecs",
    "configparser", "uuid", "ipaddress", "selectors", "platform", "array", "doctest", "timeit",
    "tokenize", "ast", "shlex", "optparse", "types", "filecmp", "fileinput", "lzma", "zlib",
)
STDLIB_CODE_MODULES = (
    "argparse", "collections/__init__", "dataclasses", "difflib", "functools", "inspect", "json/decoder",
    "json/encoder", "logging/__init__", "pathlib", "pprint", "random", "shutil", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "zipfile/__init__",
    "ast", "calendar", "configparser", "contextlib", "copy", "csv", "datetime", "enum", "fractions",
    "heapq", "ipaddress", "locale", "optparse", "pickle", "queue", "shlex", "tokenize", "traceback",
)


@dataclass(frozen=True)
class ProbeSet:
    """The probe token ids (N, T) and what produced them."""
    suite: str
    length: int
    num: int
    seed: int
    input_ids: np.ndarray
    sources: tuple[str, ...]

    def describe(self) -> dict:
        return {"suite": self.suite, "length": self.length, "num": self.num, "seed": self.seed,
                "sources": list(self.sources)}


MACHINE_SPECIFIC_SECTIONS = ("DATA", "FILE", "MODULE REFERENCE")


def _drop_sections(doc: str, names: tuple[str, ...] = MACHINE_SPECIFIC_SECTIONS) -> str:
    """Remove pydoc sections whose text depends on the machine (module data such as os.environ,
    file paths), so the corpus is the same everywhere and leaks nothing of the environment."""
    kept, skipping = [], False
    for line in doc.splitlines():
        if line and not line[0].isspace() and line.isupper():
            skipping = line.strip() in names
        if not skipping:
            kept.append(line)
    return "\n".join(kept)


_RENDER_DOCS = """
import importlib, pydoc, sys, warnings
warnings.simplefilter("ignore")
out = []
for name in sys.argv[1:]:
    try:
        out.append(pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext))
    except Exception:
        pass
sys.stdout.write("\\f".join(out))
"""


def _render_stdlib_docs() -> str:
    """pydoc text of STDLIB_DOC_MODULES, rendered in a fresh isolated interpreter.

    pydoc shows live default values (logging.shutdown's list of handlers, patched functions),
    so rendering inside a process that has imported torch or pytest would give other text:
    a clean `python -I` makes the corpus the same from the CLI, a notebook or a test."""
    done = subprocess.run([sys.executable, "-I", "-c", _RENDER_DOCS, *STDLIB_DOC_MODULES],
                          capture_output=True, text=True, encoding="utf-8", check=True)
    parts = [_drop_sections(doc) for doc in done.stdout.split("\f")]
    # object reprs carry memory addresses ("<object at 0x7f...>") and some defaults carry this
    # interpreter's path (platform.architecture(executable='/…/python')): mask both
    text = re.sub(r" at 0x[0-9a-fA-F]+", " at 0x…", "\n\n".join(parts))
    return re.sub(r"(['\"])/[^'\"\s]*\1", r"\1/…\1", text)


@functools.lru_cache(maxsize=1)
def stdlib_docs() -> str:
    """The text:stdlib corpus, rendered once per Python version and cached on disk."""
    from .demo_model import cache_root
    key = hashlib.sha256(("\n".join(STDLIB_DOC_MODULES) + _RENDER_DOCS).encode()).hexdigest()[:12]
    path = cache_root() / "corpus" / f"stdlib-docs-py{sys.version_info[0]}.{sys.version_info[1]}-{key}.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    text = _render_stdlib_docs()
    try:
        from .io import atomic_write_text
        atomic_write_text(path, text)
    except OSError:
        pass                                   # an unwritable cache only costs a re-render
    return text


@functools.lru_cache(maxsize=4)
def stdlib_code() -> str:
    """Source text of a fixed list of standard-library modules, concatenated."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [(root / f"{m}.py").read_text(encoding="utf-8", errors="replace")
             for m in STDLIB_CODE_MODULES if (root / f"{m}.py").is_file()]
    return "\n\n".join(parts)


def _read_text_file(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise AttnprofError(f"probe file {path}: no such file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise AttnprofError(f"probe file {path} is empty")
    return text


def _read_jsonl(path: str, field: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise AttnprofError(f"probe file {path}: no such file")
    texts = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)[field]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise AttnprofError(f"{path}:{lineno}: no field {field!r} in a JSON object ({exc.__class__.__name__})")
        if not isinstance(value, str):        # null or a number would become the text "None" or "3"
            raise AttnprofError(f"{path}:{lineno}: field {field!r} is {json.dumps(value)}, not a string")
        texts.append(value)
    if not any(t.strip() for t in texts):
        raise AttnprofError(f"probe file {path} has no text in field {field!r}")
    return "\n\n".join(texts)


def corpus_text(source: str) -> str:
    """The text behind a real-text source name."""
    if source == "text:stdlib":
        return stdlib_docs()
    if source == "code:stdlib":
        return stdlib_code()
    if source.startswith("file:"):
        return _read_text_file(source[5:])
    if source.startswith("jsonl:"):
        path, sep, field = source[6:].rpartition(":")
        if not sep or not path or not field:
            raise AttnprofError(f"probe source {source!r}: expected jsonl:PATH:FIELD")
        return _read_jsonl(path, field)
    raise AttnprofError(f"unknown probe source {source!r} (random, repeat, text:stdlib, code:stdlib, "
                        "file:PATH, jsonl:PATH:FIELD)")


def tokenize_corpus(text: str, tokenizer) -> np.ndarray:
    """Token ids of a corpus without special tokens, in pieces so very long texts stay fast."""
    pieces, step = [], 200_000
    for start in range(0, len(text), step):
        pieces.extend(tokenizer(text[start:start + step], add_special_tokens=False)["input_ids"])
    return np.asarray(pieces, dtype=np.int64)


def allowed_ids(tokenizer) -> np.ndarray:
    """Token ids that random probes may use: the vocabulary less special tokens (the named ones
    and every added token marked special, such as SmolLM2's <repo_name> and <issue_start>)."""
    special = set(tokenizer.all_special_ids or [])
    special |= {i for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                if getattr(token, "special", False)}
    return np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)


MIN_PROBE_LENGTH = 32


def split_suite(suite: str) -> tuple[str, ...]:
    """Split "a,b" into sources, keeping the colons of file:/jsonl: paths intact."""
    sources = tuple(s.strip() for s in suite.split(",") if s.strip())
    if not sources:
        raise AttnprofError("empty probe suite")
    return sources


def build_probes(suite: str, tokenizer, length: int, num: int, seed: int) -> ProbeSet:
    """The N probes of length T for a suite, deterministic in (suite, tokenizer, T, N, seed)."""
    if length < MIN_PROBE_LENGTH:
        raise AttnprofError(f"probe length {length} is too short (at least {MIN_PROBE_LENGTH})")
    if num < 1:
        raise AttnprofError(f"number of probes must be at least 1, got {num}")
    sources = split_suite(suite)
    rng = np.random.default_rng(seed)
    corpora: dict[str, np.ndarray] = {}
    vocabulary: np.ndarray | None = None          # allowed_ids, computed once if needed
    rows, used = [], []
    for n in range(num):
        source = sources[n % len(sources)]
        if source in ("random", "repeat") and vocabulary is None:
            vocabulary = allowed_ids(tokenizer)
        if source == "random":
            rows.append(rng.choice(vocabulary, size=length))
        elif source == "repeat":
            block = rng.choice(vocabulary, size=min(REPEAT_BLOCK, length // 2))
            rows.append(np.resize(block, length))
        else:
            if source not in corpora:
                corpora[source] = tokenize_corpus(corpus_text(source), tokenizer)
            ids = corpora[source]
            if len(ids) < length:
                raise AttnprofError(f"probe source {source} has {len(ids)} tokens, fewer than the probe "
                                    f"length {length}")
            start = int(rng.integers(0, len(ids) - length + 1))
            rows.append(ids[start:start + length])
        used.append(source)
    return ProbeSet(suite, length, num, seed, np.stack(rows).astype(np.int64), tuple(used))


def tokenizers_agree(base_tokenizer, other_tokenizer, probes: ProbeSet) -> str | None:
    """None when both tokenizers give the probes the same ids; otherwise the first disagreement."""
    drawn = [row for row, source in zip(probes.input_ids, probes.sources) if source in ("random", "repeat")]
    if drawn:
        # ids drawn without text mean the same tokens to both models only if both name them alike
        # (special tokens, which random probes never draw, may differ)
        ids = np.unique(np.concatenate(drawn)).tolist()
        for i, a, b in zip(ids, base_tokenizer.convert_ids_to_tokens(ids), other_tokenizer.convert_ids_to_tokens(ids)):
            if a != b:
                return (f"token id {i} is {a!r} to one and {b!r} to the other, so random-id probes mean "
                        "different text to each")
    for n, row in enumerate(probes.input_ids):
        if probes.sources[n] in ("random", "repeat"):
            continue
        text = base_tokenizer.decode(row)
        a = base_tokenizer(text, add_special_tokens=False)["input_ids"]
        b = other_tokenizer(text, add_special_tokens=False)["input_ids"]
        if a != b:
            return f"probe {n} tokenises differently ({probes.sources[n]})"
    return None


def fingerprint(input_ids: np.ndarray) -> str:
    """Short hash of probe ids, to prove base and merged saw identical tokens."""
    return hashlib.sha256(np.ascontiguousarray(input_ids, dtype=np.int64).tobytes()).hexdigest()[:16]
