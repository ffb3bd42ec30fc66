"""Adapter check ("adapter reality"): does a PEFT adapter fit a base model, and what will merging it do?

Reads an `adapter_config.json` (any peft version, any adapter type), builds the base architecture
from its config on the meta device (no weights, no allocation, no inference) and checks every
target against the real module names with PEFT's own matching rules. When the adapter directory
also holds `adapter_model.safetensors`, its tensor shapes are compared with the base using the
safetensors header only. The result lists findings {code, severity, message}, the effective scale,
the trainable parameter count, the adapter size, merge notes, and the published forgetting
measurements nearest the adapter's rank (never a forgetting number for this adapter).

Public API: `Finding`, `AdapterCheck`, `load_adapter_config`, `check_adapter`, `run_check_adapter`,
`adapter_scale`, `load_forgetting_evidence`, `forgetting_evidence`.

This module holds the checks and the report; reading and parsing the config (and the scale) live in
`profiler.adapter_config`, the meta-device base skeleton and PEFT target matching in
`profiler.skeleton`. Names that moved there are still importable from here.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, TextIO

from . import rules
from .adapter_config import (ALL_LINEAR, PROMPT_TYPES, SCALED_TYPES, SEVERITIES, AdapterSpec, Finding,
                             _locate_adapter, _module_rank_alpha, _plain_config, _scale,
                             parse_adapter_config)
# Not used here: re-exported so `from profiler.adapter import X` works for names that moved.
from .adapter_config import (DEFAULT_ALPHA, DEFAULT_R, FINDING_CODES, KNOWN_PEFT_TYPES, LEGACY_KEYS,
                             RANK_TYPES, adapter_scale, load_adapter_config, pattern_value)
from .errors import AttnprofError
from .results import Result
from .skeleton import (TASK_AUTO_CLASS, _Arch, _Base, _Match, _Module, _build_arch, _layer_index,
                       _load_base, _match, _module_tensors, _name_matches, _numel, _prompt_trainable)

# --- vocabulary -----------------------------------------------------------------------------

#: Module kinds each adapter type can wrap (peft raises on anything else).
SUPPORTED_KINDS = {
    "LORA": {"linear", "conv1d_t", "embedding", "conv", "mha"},
    "ADALORA": {"linear", "conv1d_t"},
    "LOHA": {"linear", "conv"},
    "LOKR": {"linear", "conv"},
    "IA3": {"linear", "conv1d_t", "conv"},
    "VERA": {"linear", "conv1d_t"},
}
# Names whose presence means the adapter is scoped to attention, when no base is available.
ATTENTION_NAMES = frozenset(("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query",
                             "key", "value", "query_key_value", "Wqkv", "q", "k", "v", "o",
                             "self_attn", "attn", "attention"))
EMBEDDING_NAMES = frozenset(("embed_tokens", "wte", "embed_in", "word_embeddings", "lm_head",
                             "embed_out", "output", "tok_embeddings", "shared"))
QUANTIZED_NAME = re.compile(r"bnb|bitsandbytes|4bit|4-bit|8bit|8-bit|nf4|gptq|awq|int4|int8|hqq|"
                            r"aqlm|exl2|gguf", re.IGNORECASE)
# Initialisations that change the base weights during training (the adapter is relative to a
# modified base unless it was converted when saved).
BASE_MODIFYING_INIT = ("pissa", "olora", "corda", "loftq")
SAFETENSORS_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
                        "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                        "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}

EVIDENCE_CAVEAT = ("Published measurements on other models and data, shown for context: they are "
                   "not a forgetting estimate for this adapter. The table holds no base-model "
                   "scores, so no change versus the base is derived from it.")


# --- results --------------------------------------------------------------------------------

@dataclass
class AdapterCheck(Result):
    """Everything `check_adapter` found. `compatible` is False when any finding is an error."""
    adapter: str
    base: str | None
    compatible: bool
    peft_type: str
    r: int | None = None
    alpha: float | None = None
    scale: float | None = None
    scale_formula: str | None = None
    scale_min: float | None = None
    scale_max: float | None = None
    rslora: bool = False
    dora: bool = False
    targets: list[str] | str | None = None
    matched_modules: list[str] = field(default_factory=list)
    unmatched_targets: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    task_type: str | None = None
    trainable_params: int | None = None
    trainable_params_source: str | None = None
    base_params: int | None = None
    size_bytes: int | None = None
    size_source: str | None = None
    mergeable: bool | None = None
    merge_notes: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 when the adapter fits (warnings allowed), 1 when an error finding says it will not."""
        return 0 if self.compatible else 1

    def codes(self, severity: str | None = None) -> set[str]:
        """The finding codes present, optionally only those of one severity."""
        return {f.code for f in self.findings if severity is None or f.severity == severity}

    def finding(self, code: str) -> Finding | None:
        """The first finding with this code, or None."""
        return next((f for f in self.findings if f.code == code), None)

    def rows(self) -> list[dict[str, Any]]:
        return [{"severity": f.severity, "code": f.code, "message": f.message} for f in self.findings]


# --- the adapter file ---------------------------------------------------------------------------

def _read_safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype)} from a safetensors header, without reading any tensor."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype()))
            return out
    except Exception as exc:          # safetensors raises its own error types for broken files
        raise AttnprofError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None


_ADAPTER_SUFFIX = re.compile(r"^(lora_|hada_|lokr_|ia3_|vera_|oft_|boft_|fourierft_|vblora_)")


def _check_file(spec: AdapterSpec, arch: _Arch, tensors: dict[str, tuple[tuple[int, ...], str]],
                matched: list[str], expected: dict[str, dict[str, tuple[int, ...]]],
                findings: list[Finding]) -> None:
    """Compare the adapter file's tensor shapes with the config and the base modules. Shapes are
    compared for the adapter types whose tensors are modelled; for others only names are checked."""
    targeted = set(matched)
    modelled = spec.peft_type in SUPPORTED_KINDS
    unknown: list[str] = []
    feature: list[str] = []
    rank: list[str] = []
    vocab: list[str] = []
    untargeted: list[str] = []
    seen: set[str] = set()
    for key, (shape, _dtype) in tensors.items():
        name = re.sub(r"^base_model\.model\.", "", key)
        name = re.sub(r"\.default(?=\.|$)", "", name)
        if name in ("base_model.vera_A", "base_model.vera_B", "prompt_embeddings") or "." not in name:
            continue
        parts = name.split(".")
        mod = None
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in arch.modules:
                mod, suffix = arch.modules[prefix], ".".join(parts[i:])
                break
        if mod is None:
            unknown.append(name)
            continue
        suffix = re.sub(r"^(lora_magnitude_vector)\.weight$", r"\1", suffix)
        if _ADAPTER_SUFFIX.match(suffix):
            if modelled and mod.name not in targeted:
                untargeted.append(mod.name)
                continue
            seen.add(mod.name)
            want = expected.get(mod.name, {})
            if suffix in want and tuple(want[suffix]) != shape:
                _classify_shape(spec, mod, suffix, shape, want[suffix], feature, rank, vocab)
            continue
        param = suffix.removeprefix("base_layer.")
        base_shape = dict(mod.params).get(param)
        if base_shape is None:
            unknown.append(name)
        elif base_shape != shape:
            is_vocab = mod.kind == "embedding" or mod.name == arch.output_name
            (vocab if is_vocab and shape[0] != base_shape[0] else feature).append(
                f"{name} {list(shape)} vs base {list(base_shape)}")
    if unknown:
        findings.append(Finding("base_mismatch", "error",
                                f"{len(unknown)} adapter tensor(s) name modules this base does not have "
                                f"(e.g. {unknown[0]}): it was trained on another architecture"))
    if feature:
        findings.append(Finding("base_mismatch", "error",
                                f"{len(feature)} adapter tensor(s) do not fit the base's layer sizes "
                                f"(e.g. {feature[0]}): trained on a base of another size"))
    if vocab:
        findings.append(Finding("embedding_resize", "error",
                                f"adapter vocabulary differs from the base's ({vocab[0]}; base vocab "
                                f"{arch.vocab_size}): resize the base's token embeddings "
                                "(and use the adapter's tokenizer) before loading"))
    if rank:
        findings.append(Finding("weights_mismatch", "error",
                                f"{len(rank)} tensor(s) have a rank other than the config's (e.g. {rank[0]}): "
                                "the config does not describe these weights"))
    if untargeted:
        findings.append(Finding("weights_mismatch", "warning",
                                f"the file holds adapter tensors for {len(set(untargeted))} module(s) the "
                                f"config does not target (e.g. {untargeted[0]}): peft ignores them"))
    missing = [n for n in expected if n not in seen]
    if expected and missing:
        findings.append(Finding("weights_mismatch", "warning",
                                f"{len(missing)} of {len(expected)} targeted module(s) have no tensors in "
                                f"the file (e.g. {missing[0]}): they load at their initial value"))


def _classify_shape(spec: AdapterSpec, mod: _Module, suffix: str, shape: tuple[int, ...],
                    want: tuple[int, ...], feature: list[str], rank: list[str], vocab: list[str]) -> None:
    """Sort one mismatched tensor into feature-size, rank or vocabulary trouble."""
    label = f"{mod.name}.{suffix} {list(shape)} vs expected {list(want)}"
    r, _ = _module_rank_alpha(spec, mod.name)
    if len(shape) != len(want):
        feature.append(label)
        return
    differing = [i for i, (a, b) in enumerate(zip(shape, want)) if a != b]
    if mod.kind == "embedding" and suffix == "lora_embedding_A" and differing == [1]:
        vocab.append(label)
    elif all(want[i] == r for i in differing):
        rank.append(label)
    else:
        feature.append(label)


# --- evidence -----------------------------------------------------------------------------------

def load_forgetting_evidence() -> list[dict[str, str]]:
    """The packaged literature table (profiler/data/forgetting_evidence.csv), one dict per row."""
    text = resources.files("profiler").joinpath("data/forgetting_evidence.csv").read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def _citation(row: Mapping[str, str]) -> str:
    """'Authors year (venue), arXiv:id' for one table row."""
    return f"{row['source_short']}, arXiv:{row['source_arxiv']}"


def forgetting_evidence(rank: int | None, peft_type: str = "LORA") -> dict[str, Any]:
    """The published rows near `rank` and the LoRA-vs-full-FT gaps they report within one setup.

    "Near" means within a factor of rules.EVIDENCE_RANK_FACTOR in rank. No number is produced for
    the adapter itself, and nothing is measured against the base model (the table has no base scores).
    """
    rows = load_forgetting_evidence()
    lora_ranks = sorted({int(r["lora_rank"]) for r in rows if r["method"] == "LoRA" and r["lora_rank"]})
    out: dict[str, Any] = {"rank": rank, "near_rule": f"LoRA rank within a factor of "
                           f"{rules.EVIDENCE_RANK_FACTOR:g} of the adapter's rank",
                           "table_ranks": lora_ranks, "rows": [], "gaps": [], "caveat": EVIDENCE_CAVEAT}
    if peft_type not in ("LORA", "ADALORA") or rank is None:
        out["applicable"] = False
        out["message"] = (f"The table reports LoRA ranks only; it does not apply to a {peft_type} adapter."
                          if peft_type not in ("LORA", "ADALORA") else "The adapter's rank is unknown.")
        return out
    out["applicable"] = True

    def distance(row: Mapping[str, str]) -> float:
        return abs(math.log(int(row["lora_rank"]) / rank))

    near = [row for row in rows if row["method"] == "LoRA" and row["lora_rank"]
            and distance(row) <= math.log(rules.EVIDENCE_RANK_FACTOR) + 1e-12]
    near.sort(key=distance)
    setup = ("source_arxiv", "base_model", "regime", "train_data")
    shown: set[int] = set()
    for row in near:
        pairs = [p for p in rows if p["method"] == "full fine-tuning"
                 and all(p[k] == row[k] for k in setup)]
        for item in [row, *pairs]:
            if id(item) not in shown:
                shown.add(id(item))
                out["rows"].append({**item, "citation": _citation(item)})
        for full in pairs:
            gap = round((float(row["value"]) - float(full["value"])) * 100, 1)
            direction = "less" if gap >= 0 else "more"
            out["gaps"].append({
                "setup": f"{row['base_model']} {row['regime']} on {row['train_data']}",
                "lora_rank": int(row["lora_rank"]), "lora_value": float(row["value"]),
                "full_ft_value": float(full["value"]), "gap_pp": gap,
                "metric": row["forgetting_metric"], "citation": _citation(row),
                "provenance": row["provenance"],
                "statement": (f"{row['base_model']} {row['regime']} on {row['train_data']}: LoRA r="
                              f"{row['lora_rank']} {row['value']} vs full FT {full['value']} = "
                              f"{abs(gap):.1f} pp {direction} forgetting"),
            })
    if near:
        ranks = sorted({int(r["lora_rank"]) for r in near})
        out["message"] = (f"{len(near)} published LoRA row(s) near r={rank} (rank "
                          f"{', '.join(map(str, ranks))}), each beside full fine-tuning in the same setup.")
    else:
        nearest = min(lora_ranks, key=lambda k: abs(math.log(k / rank))) if lora_ranks else None
        out["nearest_rank"] = nearest
        out["message"] = (f"No published row is near r={rank} (the table's LoRA ranks are "
                          f"{', '.join(map(str, lora_ranks))}; near = within a factor of "
                          f"{rules.EVIDENCE_RANK_FACTOR:g}).")
    return out


# --- the check ----------------------------------------------------------------------------------

def check_adapter(adapter: Any, base: Any = None) -> AdapterCheck:
    """Check a PEFT adapter against a base model without loading weights or running inference.

    `adapter`: an adapter_config.json path, an adapter directory, a cached hub id, or a config dict.
    `base`: a local model directory, a cached hub id, a config.json path, a transformers config or
    model object, or None (then the base named in the adapter is used when it is available locally).
    Raises AttnprofError for unreadable input.
    """
    is_object = not isinstance(adapter, (str, os.PathLike)) and hasattr(adapter, "to_dict")
    if isinstance(adapter, Mapping) or is_object:
        raw, adapter_dir, label = _plain_config(adapter), None, "<config>"
    else:
        raw, adapter_dir = _locate_adapter(adapter)
        label = str(adapter)
    spec, findings = parse_adapter_config(raw)
    result = AdapterCheck(adapter=label, base=None, compatible=True, peft_type=spec.peft_type,
                          task_type=spec.task_type, modules_to_save=list(spec.modules_to_save))

    info = _resolve_base(spec, base, findings)
    arch = info.arch if info else None
    result.base = info.label if info else None
    tensors = None
    if adapter_dir is not None:
        weights = adapter_dir / "adapter_model.safetensors"
        if weights.is_file():
            tensors = _read_safetensors_header(weights)
        elif (adapter_dir / "adapter_model.bin").is_file():
            findings.append(Finding("weights_mismatch", "info", "adapter_model.bin (pickle) is not opened: "
                                    "tensor shapes were not checked"))

    _fill_rank_and_scale(spec, result, findings)
    expected = _check_targets(spec, result, findings, info)
    _check_prompt(spec, findings, arch)
    _count(spec, result, arch, expected, tensors)
    if arch is not None and tensors is not None:
        _check_file(spec, arch, tensors, result.matched_modules, expected, findings)
    _check_embeddings(spec, findings, arch)
    _check_base_identity(spec, findings, info)
    _check_task(spec, findings, info)
    _merge_notes(spec, result, findings)
    evidence_rank = spec.target_r if spec.peft_type == "ADALORA" else spec.r
    result.evidence = forgetting_evidence(evidence_rank, spec.peft_type)
    if spec.peft_type == "LORA" and spec.dora and result.evidence.get("applicable"):
        result.evidence["message"] += " (These are plain LoRA rows; this adapter uses DoRA.)"

    order = {s: i for i, s in enumerate(SEVERITIES)}
    result.findings = sorted(findings, key=lambda f: order.get(f.severity, 3))
    result.compatible = not any(f.severity == "error" for f in findings)
    return result


def _resolve_base(spec: AdapterSpec, base: Any, findings: list[Finding]) -> _Base | None:
    """Load BASE, or the base the adapter names when it is available locally; build its skeleton."""
    loaded = None
    if base is not None:
        loaded = _load_base(base)
    elif spec.base_name:
        loaded = _base_named_by_adapter(spec.base_name)
        if loaded is not None:
            findings.append(Finding("base_from_adapter", "info",
                                    f"no --base given: checking against {spec.base_name}, the base the "
                                    "adapter names (found locally)"))
    if loaded is None:
        named = (f"the base it names ({spec.base_name}) is not available locally" if spec.base_name
                 else "the adapter does not name its base")
        findings.append(Finding("base_unknown", "warning",
                                f"no --base given and {named}: target modules and shapes are not checked "
                                "against real module names"))
        return None
    info, cfg = loaded
    if info.arch is None and cfg is not None:
        _build_arch(info, cfg, spec.task_type)
    if info.arch is None:
        findings.append(Finding("base_unknown", "warning",
                                f"base {info.label}: {info.problem or 'its architecture is unknown'}; "
                                "target modules are not checked"))
    return info


_HUB_ID_LIKE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _base_named_by_adapter(name: str) -> tuple[_Base, Any] | None:
    """The adapter's base_model_name_or_path when it is a local model dir or a cached hub id."""
    path = Path(name).expanduser()
    local = path.is_dir() and (path / "config.json").is_file()
    if not local and (path.exists() or not _HUB_ID_LIKE.match(name)):
        return None
    try:
        return _load_base(name)
    except AttnprofError:
        return None


def _fill_rank_and_scale(spec: AdapterSpec, result: AdapterCheck, findings: list[Finding]) -> None:
    """r, alpha, the effective scale (default and per pattern) and the findings about them."""
    result.r, result.alpha, result.rslora, result.dora = spec.r, spec.alpha, spec.rslora, spec.dora
    if spec.peft_type in PROMPT_TYPES or spec.peft_type in ("IA3", "LN_TUNING", "TRAINABLE_TOKENS"):
        what = ("adds trainable virtual tokens; there is no weight update to merge"
                if spec.peft_type in PROMPT_TYPES else "rescales or retrains existing weights; no low-rank update")
        findings.append(Finding("not_rank_based", "warning" if spec.peft_type in PROMPT_TYPES else "info",
                                f"{spec.peft_type} {what}: no rank, no alpha/r scale"))
        return
    if spec.peft_type == "VERA":
        findings.append(Finding("not_rank_based", "info", "VERA trains only scaling vectors over frozen "
                                "shared random projections: rank r but no alpha/r scale"))
        return
    if spec.peft_type not in SCALED_TYPES:
        return
    result.scale = _scale(spec)
    if result.scale is None:
        return
    result.scale_formula = "alpha/sqrt(r)" if spec.rslora else "alpha/r"
    names = list(spec.rank_pattern) + [k for k in spec.alpha_pattern if k not in spec.rank_pattern]
    scales = {"(default)": result.scale}
    for key in names:          # a module named like the key takes r and alpha as peft resolves them
        scale = _scale(spec, key)
        if scale is not None:
            scales[key] = scale
    result.scale_min, result.scale_max = min(scales.values()), max(scales.values())
    high = {k: v for k, v in scales.items() if v > rules.SCALING_HIGH}
    low = {k: v for k, v in scales.items() if v < rules.SCALING_LOW}
    formula = result.scale_formula
    if high:
        findings.append(Finding("scaling_high", "warning",
                                f"effective scale {_fmt_scales(high)} ({formula}) > {rules.SCALING_HIGH:g}: "
                                "the update is amplified; expect larger drift from the base (and in the "
                                "attention profile) than the rank suggests"))
    if low:
        findings.append(Finding("scaling_low", "warning",
                                f"effective scale {_fmt_scales(low)} ({formula}) < {rules.SCALING_LOW:g}: "
                                "the update is damped; the adapter may barely change the model"))
    if spec.rslora:
        findings.append(Finding("rslora", "info",
                                f"rsLoRA: scale = alpha/sqrt(r) = {spec.alpha:g}/sqrt({spec.r}) = {result.scale:.4g} "
                                f"(plain LoRA would use {spec.alpha / spec.r:.4g}); merge with this scale"))
    if spec.peft_type == "ADALORA" or spec.rank_pattern:
        if spec.adaptive_ranks:
            ranks = sorted(spec.adaptive_ranks.values())
            detail = (f"AdaLoRA budget kept {ranks[0]}..{ranks[-1]} of init_r={spec.r} ranks across "
                      f"{len(ranks)} modules")
        elif spec.peft_type == "ADALORA":
            detail = f"AdaLoRA prunes from init_r={spec.r} towards target_r={spec.target_r} while training"
        else:
            detail = "rank_pattern gives " + ", ".join(f"{k}: r={v}" for k, v in list(spec.rank_pattern.items())[:4])
        findings.append(Finding("adaptive_rank", "info",
                                f"{detail}: the rank (and scale) differ per module; r={spec.r} is not the "
                                "rank of every update"))


def _fmt_scales(scales: Mapping[str, float]) -> str:
    """'8 for q_proj, 2' style list of scales for a message."""
    return ", ".join(f"{v:.4g}" if k == "(default)" else f"{v:.4g} for {k}" for k, v in scales.items())


def _check_targets(spec: AdapterSpec, result: AdapterCheck, findings: list[Finding],
                   info: _Base | None) -> dict[str, dict[str, tuple[int, ...]]]:
    """Match targets against the base modules. Returns {module name: expected adapter tensors}."""
    if spec.peft_type in PROMPT_TYPES:
        return {}
    targets = spec.targets
    arch = info.arch if info else None
    if targets is None:
        default = _peft_default_targets(spec.peft_type, info.model_type if info else None)
        if default is None:
            message = ("target_modules is not set and peft has no default for this base"
                       if arch is not None else "target_modules is not set: peft picks defaults by "
                       "model type when the adapter is created")
            findings.append(Finding("targets_missing" if arch is not None else "targets_default",
                                    "error" if arch is not None else "info", message))
            return {}
        findings.append(Finding("targets_default", "info",
                                f"target_modules is not set: peft's default for {info.model_type} is "
                                f"{', '.join(default)}"))
        targets = default
    result.targets = targets
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        findings.append(Finding("targets_all_linear", "info",
                                "targets all linear layers (attention and MLP, not the output layer): "
                                "the update reaches every block, the most drift per rank"))
    if arch is None:
        if isinstance(targets, list) and targets and all(t in ATTENTION_NAMES for t in targets):
            findings.append(Finding("targets_attention_only", "info",
                                    f"targets only attention projections ({', '.join(targets)}): the MLPs "
                                    "are untouched and any change lands in attention"))
        return {}

    match = _match(spec, arch, targets)
    result.matched_modules = match.matched
    result.unmatched_targets = match.unmatched
    _report_layers(spec, arch, match, findings)
    if not match.matched:
        what = (f"no module of the base matches target_modules ({_show(targets)})"
                if match.unmatched else "every matching module is removed by layers_to_transform/"
                "exclude_modules/modules_to_save")
        findings.append(Finding("targets_missing", "error",
                                f"{what}: peft refuses to create this adapter on {arch.model_class}"))
        return {}
    if match.unmatched:
        findings.append(Finding("targets_missing", "warning",
                                f"target(s) {', '.join(match.unmatched)} match no module of "
                                f"{arch.model_class}: only {_show_leaves(match.matched)} get the adapter"))
    kinds = SUPPORTED_KINDS.get(spec.peft_type)
    bad = [n for n in match.matched if kinds is not None and arch.modules[n].kind not in kinds]
    if bad:
        mod = arch.modules[bad[0]]
        findings.append(Finding("targets_unsupported", "error",
                                f"{len(bad)} matched module(s) cannot take a {spec.peft_type} adapter "
                                f"(e.g. {bad[0]} is a {mod.kind} layer): peft raises on load"))
    in_attention = [arch.modules[n].attention for n in match.matched]
    if all(in_attention):
        findings.append(Finding("targets_attention_only", "info",
                                f"only attention projections are adapted ({_show_leaves(match.matched)}): "
                                "the MLPs are untouched and any change lands in attention"))
    if (not (isinstance(targets, str) and targets.lower() == ALL_LINEAR)
            and set(match.matched) >= set(match.all_linear) and match.all_linear):
        findings.append(Finding("targets_all_linear", "info",
                                f"the targets cover all {len(match.all_linear)} linear layers (attention and "
                                "MLP): the update reaches every block"))
    _fan_in_fan_out(spec, arch, match.matched, findings)
    expected: dict[str, dict[str, tuple[int, ...]]] = {}
    for name in match.matched:
        if arch.modules[name].kind in (kinds or set()):
            ff = bool(spec.feedforward) and _name_matches(spec.feedforward, name)
            tensors = _module_tensors(spec, arch.modules[name], ff)
            if tensors is not None:
                expected[name] = tensors
    return expected


def _peft_default_targets(peft_type: str, model_type: str | None) -> list[str] | None:
    """peft's built-in default targets for a model type (needs peft; None when it has none)."""
    if model_type is None:
        return None
    try:
        from peft.utils import constants
    except ImportError:
        return None
    mapping = getattr(constants, f"TRANSFORMERS_MODELS_TO_{peft_type}_TARGET_MODULES_MAPPING", None)
    value = mapping.get(model_type) if isinstance(mapping, dict) else None
    return list(value) if value else None


def _report_layers(spec: AdapterSpec, arch: _Arch, match: _Match, findings: list[Finding]) -> None:
    """layers_to_transform indices outside the base, or a layers_pattern that names nothing."""
    if spec.layers is None:
        return
    if spec.layers_pattern and not any(_layer_index(spec, n) is not None for n in arch.modules):
        findings.append(Finding("layers_out_of_range", "error",
                                f"layers_pattern {spec.layers_pattern} names no layer list of "
                                f"{arch.model_class}: layers_to_transform selects nothing"))
        return
    n = arch.num_layers
    if n is None:
        return
    outside = sorted({i for i in spec.layers if not 0 <= i < n})
    if outside:
        severity = "error" if len(outside) == len(set(spec.layers)) else "warning"
        findings.append(Finding("layers_out_of_range", severity,
                                f"layers_to_transform {outside} is outside the base's {n} layers (0..{n - 1})"
                                + ("" if severity == "warning" else ": nothing is adapted")))


def _fan_in_fan_out(spec: AdapterSpec, arch: _Arch, matched: list[str], findings: list[Finding]) -> None:
    """Note where peft will flip fan_in_fan_out to suit the layer type."""
    kinds = {arch.modules[n].kind for n in matched}
    if spec.peft_type not in ("LORA", "ADALORA", "IA3", "VERA"):
        return
    if spec.fan_in_fan_out and "linear" in kinds:
        findings.append(Finding("config_invalid", "info", "fan_in_fan_out=true but the targets are nn.Linear "
                                "layers: peft resets it to false"))
    elif not spec.fan_in_fan_out and "conv1d_t" in kinds:
        findings.append(Finding("config_invalid", "info", "fan_in_fan_out=false but the targets are GPT-2 style "
                                "Conv1D layers: peft sets it to true"))


def _show(targets: list[str] | str) -> str:
    """Targets as one string."""
    return targets if isinstance(targets, str) else ", ".join(targets)


def _show_leaves(names: list[str]) -> str:
    """'q_proj, v_proj (64 modules)' for a list of module names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return f"{', '.join(leaves)} ({len(names)} module{'s' if len(names) != 1 else ''})"


def _check_prompt(spec: AdapterSpec, findings: list[Finding], arch: _Arch | None) -> None:
    """Prompt-learning adapters: token_dim and num_layers must match the base."""
    if spec.peft_type not in PROMPT_TYPES or arch is None:
        return
    dim, layers = spec.prompt.get("token_dim"), spec.prompt.get("num_layers")
    allowed = {arch.hidden_size} | ({arch.kv_dim} if spec.peft_type == "PREFIX_TUNING" else set())
    if dim is not None and arch.hidden_size is not None and dim not in allowed:
        findings.append(Finding("base_mismatch", "error", f"token_dim={dim} but the base's hidden size is "
                                f"{arch.hidden_size}: the virtual tokens do not fit this base"))
    if spec.peft_type == "PREFIX_TUNING" and layers is not None and arch.num_layers not in (None, layers):
        findings.append(Finding("base_mismatch", "error", f"num_layers={layers} but the base has "
                                f"{arch.num_layers} layers: the prefix does not fit this base"))


def _count(spec: AdapterSpec, result: AdapterCheck, arch: _Arch | None,
           expected: dict[str, dict[str, tuple[int, ...]]],
           tensors: dict[str, tuple[tuple[int, ...], str]] | None) -> None:
    """Trainable parameters and adapter size, from the base shapes when known."""
    if arch is not None:
        result.base_params = arch.total_params
    count = None
    extra_saved = 0
    if spec.peft_type in PROMPT_TYPES:
        count = _prompt_trainable(spec, arch)
        source = "config"
    elif arch is not None and result.matched_modules and spec.peft_type in SUPPORTED_KINDS:
        count = sum(_numel(s) for t in expected.values() for s in t.values())
        count += _extra_trainable(spec, arch, result.matched_modules)
        for name in result.matched_modules:
            mod = arch.modules[name]
            if spec.peft_type == "LORA" and (mod.kind == "embedding" or name == arch.output_name):
                extra_saved += sum(_numel(s) for _, s in mod.params)
        if spec.peft_type == "VERA" and spec.save_projection and expected:
            r = spec.r or 0
            extra_saved += r * max(arch.modules[n].in_features or 0 for n in expected)
            extra_saved += r * max(arch.modules[n].out_features or 0 for n in expected)
        source = "base shapes"
    if count is None and tensors is not None:
        frozen = re.compile(r"(\.base_layer\.|vera_A$|vera_B$)")
        count = sum(_numel(s) for k, (s, _) in tensors.items() if not frozen.search(k))
        source = "adapter file"
    if count is not None:
        result.trainable_params, result.trainable_params_source = count, source
    if tensors is not None:
        result.size_bytes = sum(_numel(s) * SAFETENSORS_ITEMSIZE.get(d, 4) for s, d in tensors.values())
        result.size_source = "adapter file"
    elif count is not None:
        result.size_bytes = 4 * (count + extra_saved)
        result.size_source = "estimate at fp32 (peft's default adapter dtype)"


def _extra_trainable(spec: AdapterSpec, arch: _Arch, matched: list[str]) -> int:
    """Parameters made trainable besides the adapter tensors: modules_to_save and biases."""
    total = 0
    for name, mod in arch.modules.items():
        if spec.modules_to_save and any(name.endswith(m) for m in spec.modules_to_save):
            if not any(name.startswith(other + ".") for other in arch.modules
                       if other != name and any(other.endswith(m) for m in spec.modules_to_save)):
                total += mod.numel
    if spec.peft_type in ("LORA", "ADALORA", "VERA") and spec.bias != "none":
        chosen = arch.modules.values() if spec.bias == "all" else (arch.modules[n] for n in matched)
        total += sum(_numel(s) for mod in chosen for p, s in mod.params if p == "bias")
    return total


def _check_embeddings(spec: AdapterSpec, findings: list[Finding], arch: _Arch | None) -> None:
    """modules_to_save that replace the token embeddings or the output layer."""
    if not spec.modules_to_save:
        return
    if arch is not None:
        touched = [n for n, m in arch.modules.items()
                   if any(n.endswith(s) for s in spec.modules_to_save)
                   and (m.kind == "embedding" or n == arch.output_name)]
    else:
        touched = [s for s in spec.modules_to_save if s.rsplit(".", 1)[-1] in EMBEDDING_NAMES]
    if touched:
        findings.append(Finding("embedding_resize", "warning",
                                f"modules_to_save includes {', '.join(touched)}: the adapter carries full "
                                "copies of the embedding/output matrix (usually new tokens were added); "
                                "merging replaces them wholesale, a full-rank change, and the tokenizer "
                                "must be the adapter's"))


def _check_base_identity(spec: AdapterSpec, findings: list[Finding], info: _Base | None) -> None:
    """The adapter's named base versus the given one, and signs of a quantised base."""
    if info is None:
        return
    if spec.base_name is None:
        findings.append(Finding("base_unnamed", "info", "the adapter does not name its base "
                                "(base_model_name_or_path): cannot confirm it was trained on "
                                f"{info.label}"))
    elif info.name and _norm_name(spec.base_name) != _norm_name(info.name):
        findings.append(Finding("base_mismatch", "warning",
                                f"the adapter was trained on {spec.base_name} but is checked against "
                                f"{info.name}: names differ (fine for a local copy of the same model; a "
                                "different checkpoint of the same architecture loads but gives other results)"))
    if spec.base_class and info.arch is not None:
        family = _family(spec.base_class)
        base_family = _family(info.arch.model_class)
        if family and base_family and family != base_family:
            findings.append(Finding("base_mismatch", "warning",
                                    f"the adapter was created on a {spec.base_class}, the base builds a "
                                    f"{info.arch.model_class}"))
    quant = []
    if spec.base_name and QUANTIZED_NAME.search(spec.base_name):
        quant.append(f"the adapter's base id {spec.base_name!r} names a quantised model")
    if info.quant:
        quant.append(info.quant)
    if info.name and info.name != spec.base_name and QUANTIZED_NAME.search(info.name):
        quant.append(f"the base {info.name!r} names a quantised model")
    _quant_finding(quant, findings)


def _quant_finding(reasons: list[str], findings: list[Finding]) -> None:
    """One quantized_base finding listing every reason."""
    if reasons:
        findings.append(Finding("quantized_base", "warning",
                                f"quantised base ({'; '.join(reasons)}): a QLoRA adapter learned its update "
                                "against the quantised weights, so merging into a full-precision or "
                                "de-quantised base changes the weights beyond scale*B*A"))


def _norm_name(name: str) -> str:
    """The last path segment of a model id or path, lower-cased, for comparing names."""
    return re.split(r"[/\\]", name.strip().rstrip("/\\"))[-1].lower()


def _family(class_name: str) -> str:
    """The architecture family of a model class name (LlamaForCausalLM -> llama)."""
    return re.sub(r"(For\w+|LMHeadModel|Model)$", "", class_name).lower()


def _check_task(spec: AdapterSpec, findings: list[Finding], info: _Base | None) -> None:
    """task_type other than CAUSAL_LM, or a base without a causal-LM head."""
    task = spec.task_type
    if task is None:
        return
    if task not in TASK_AUTO_CLASS:
        findings.append(Finding("task_type_mismatch", "warning",
                                f"task_type {task!r} is not a peft task type (CAUSAL_LM expected)"))
        return
    if task != "CAUSAL_LM":
        findings.append(Finding("task_type_mismatch", "warning",
                                f"task_type {task}: attnprof compares causal LMs; a {task} adapter was "
                                "trained with another head, which a merged causal LM does not have"))
        return
    if info is not None and info.model_type:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if info.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            findings.append(Finding("task_type_mismatch", "warning",
                                    f"task_type CAUSAL_LM but {info.model_type} has no causal-LM head in "
                                    "transformers"))


def _merge_notes(spec: AdapterSpec, result: AdapterCheck, findings: list[Finding]) -> None:
    """Whether and how the adapter merges into the base weights; DoRA, bias and init findings."""
    notes = []
    if spec.peft_type in PROMPT_TYPES:
        result.mergeable = False
        notes.append("prompt-learning adapter: nothing to merge; it only works wrapped by peft")
    elif spec.peft_type in SUPPORTED_KINDS:
        result.mergeable = True
        if spec.peft_type in SCALED_TYPES and result.scale is not None:
            notes.append(f"merge_and_unload adds scale*update with scale {result.scale:.4g} "
                         f"({result.scale_formula})")
    if spec.dora:
        findings.append(Finding("dora_merge", "warning",
                                "DoRA: merging rescales each column to a learned magnitude, "
                                "W = m * (W0 + s*B*A) / ||W0 + s*B*A||, so the merged change is not the "
                                "low-rank s*B*A and weight-diff ranks will look higher than r"))
        notes.append("DoRA: the merged weight change is not low rank (magnitude rescaling)")
    if any(f.code == "quantized_base" for f in findings):
        notes.append("quantised base: merge into the exact weights the adapter was trained against, "
                     "or expect extra drift")
    if spec.modules_to_save:
        notes.append(f"modules_to_save ({', '.join(spec.modules_to_save)}) replace the base's modules "
                     "wholesale on merge (full-rank change)")
    if spec.bias != "none" and spec.peft_type in ("LORA", "ADALORA", "VERA"):
        findings.append(Finding("bias_trained", "info", f"bias={spec.bias}: biases were trained too; the "
                                "merge changes them as well as the low-rank weight update"))
        notes.append(f"bias={spec.bias}: trained biases are merged too")
    if spec.init and spec.init.startswith(BASE_MODIFYING_INIT):
        findings.append(Finding("base_modified_init", "warning",
                                f"init_lora_weights={spec.init!r} rewrites the base weights when the adapter "
                                "is created: the adapter is relative to that modified base unless it was "
                                "converted when saved (path_initial_model_for_weight_conversion)"))
        notes.append(f"{spec.init} initialisation: merge onto the base it was initialised from")
    result.merge_notes = notes


# --- CLI entry ----------------------------------------------------------------------------------

def format_report(check: AdapterCheck) -> str:
    """The readable text report of `attnprof check-adapter`."""
    lines = [f"attnprof check-adapter: {check.adapter}"]
    kind = check.peft_type + (" (DoRA)" if check.dora else "") + (" (rsLoRA)" if check.rslora else "")
    rank = f"  r={check.r}" if check.r is not None else ""
    alpha = f"  alpha={check.alpha:g}" if check.alpha is not None else ""
    scale = f"  scale={check.scale:.4g} ({check.scale_formula})" if check.scale is not None else ""
    if check.scale_min is not None and check.scale_max is not None and check.scale_min != check.scale_max:
        scale += f"  [per module {check.scale_min:.4g}..{check.scale_max:.4g}]"
    lines.append(f"  adapter    {kind}{rank}{alpha}{scale}")
    lines.append(f"  base       {check.base or '(none: targets not checked)'}")
    if check.targets is not None:
        checked = check.base and "base_unknown" not in check.codes()
        matched = f" -> {len(check.matched_modules)} modules matched" if checked else ""
        lines.append(f"  targets    {_show(check.targets)}{matched}")
    if check.trainable_params is not None:
        share = (f" ({100 * check.trainable_params / check.base_params:.3g}% of the base's "
                 f"{check.base_params:,})" if check.base_params else "")
        lines.append(f"  trainable  {check.trainable_params:,} parameters{share} [{check.trainable_params_source}]")
    if check.size_bytes is not None:
        lines.append(f"  size       {_human_bytes(check.size_bytes)} [{check.size_source}]")
    if check.mergeable is not None:
        lines.append(f"  mergeable  {'yes' if check.mergeable else 'no'}")
    for note in check.merge_notes:
        lines.append(f"             - {note}")
    lines.append("findings:" if check.findings else "findings: none")
    for f in check.findings:
        lines.append(f"  [{f.severity}] {f.code}: {f.message}")
    ev = check.evidence
    lines.append("forgetting evidence (published; not a prediction for this adapter):")
    lines.append(f"  {ev.get('message', '')}")
    for gap in ev.get("gaps", []):
        lines.append(f"  - {gap['statement']}")
        lines.append(f"    metric: {gap['metric']}; source: {gap['citation']}")
        lines.append(f"    provenance: {gap['provenance']}")
    lines.append(f"  {ev.get('caveat', EVIDENCE_CAVEAT)}")
    errors = sum(f.severity == "error" for f in check.findings)
    warns = sum(f.severity == "warning" for f in check.findings)
    verdict = "compatible" if check.compatible else "NOT compatible"
    lines.append(f"result: {verdict} ({errors} error(s), {warns} warning(s))")
    return "\n".join(lines) + "\n"


def _human_bytes(n: int) -> str:
    """A byte count in B/KB/MB/GB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"


def run_check_adapter(adapter: Any, base: Any = None, as_json: bool = False,
                      out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`attnprof check-adapter`: print the JSON or text report; return 0 (compatible), 1 (an error
    finding: it will not load/apply as intended) or 2 (unreadable input, one line on stderr)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        check = check_adapter(adapter, base)
    except AttnprofError as exc:
        reason = " ".join(str(exc).split())
        err.write(f"attnprof: error: {reason}\n")
        return 2
    out.write(check.to_json() if as_json else format_report(check))
    return check.exit_code
