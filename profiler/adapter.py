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
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, TextIO

from . import rules
from .errors import AttnprofError
from .results import Result

# --- vocabulary -----------------------------------------------------------------------------

SEVERITIES = ("error", "warning", "info")

#: Every finding code the check can emit (the first fifteen are the ones DESIGN.md §8 names).
FINDING_CODES = (
    "base_mismatch", "base_unknown", "targets_missing", "targets_attention_only",
    "targets_all_linear", "scaling_high", "scaling_low", "rslora", "dora_merge",
    "embedding_resize", "quantized_base", "adaptive_rank", "layers_out_of_range",
    "not_rank_based", "task_type_mismatch",
    "config_invalid", "legacy_keys", "peft_type_unknown", "targets_unsupported",
    "weights_mismatch", "base_modified_init", "base_unnamed", "base_from_adapter",
    "targets_default", "bias_trained",
)

ALL_LINEAR = "all-linear"

KNOWN_PEFT_TYPES = frozenset((
    "PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "LORA", "ADALORA",
    "ADAMSS", "BOFT", "ADAPTION_PROMPT", "IA3", "BEFT", "LILY", "LOHA", "LOKR", "OFT", "POLY",
    "LN_TUNING", "VERA", "FROD", "PVERA", "FOURIERFT", "GLORA", "XLORA", "HRA", "VBLORA",
    "UNILORA", "CPT", "MISS", "RANDLORA", "ROAD", "TRAINABLE_TOKENS", "HIRA", "SHIRA", "C3A",
    "WAVEFT", "OSF", "DELORA", "GRALORA", "CARTRIDGE", "TINYLORA", "PSOFT", "PEANUT", "SHADOW",
    "SUPERTUNING", "DEFT",
))
#: Adapters whose update is scale * (low-rank product): scale = alpha / r.
SCALED_TYPES = frozenset(("LORA", "ADALORA", "LOHA", "LOKR"))
#: Adapters with a rank r (VeRA has a rank but no alpha).
RANK_TYPES = SCALED_TYPES | {"VERA"}
#: Adapters that add virtual tokens instead of changing weights: nothing to merge.
PROMPT_TYPES = frozenset(("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING",
                          "ADAPTION_PROMPT", "CPT"))
#: Module kinds each adapter type can wrap (peft raises on anything else).
SUPPORTED_KINDS = {
    "LORA": {"linear", "conv1d_t", "embedding", "conv", "mha"},
    "ADALORA": {"linear", "conv1d_t"},
    "LOHA": {"linear", "conv"},
    "LOKR": {"linear", "conv"},
    "IA3": {"linear", "conv1d_t", "conv"},
    "VERA": {"linear", "conv1d_t"},
}
# Defaults of the peft config classes, used when an (old or hand-written) config omits a key.
DEFAULT_R = {"LORA": 8, "LOHA": 8, "LOKR": 8, "VERA": 256, "ADALORA": 12}
DEFAULT_ALPHA = 8.0

TASK_AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel",
}
LEGACY_KEYS = {
    "enable_lora": "peft<0.3 MergedLinear switch (which slices of a fused qkv get LoRA); "
                   "modern peft ignores it and adapts the whole fused projection",
    "merge_weights": "peft<0.3 merge-on-eval flag; modern peft ignores it (merge explicitly)",
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
class Finding:
    """One observation about the adapter: a stable `code`, a `severity` and a readable message."""
    code: str
    severity: str
    message: str


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


# --- reading the adapter config ---------------------------------------------------------------

def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a file, or AttnprofError with one line saying why not."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AttnprofError(f"{path}: cannot read {what} ({type(exc).__name__})") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise AttnprofError(f"{path}: {what} is not valid JSON{where}") from None
    if not isinstance(data, dict):
        raise AttnprofError(f"{path}: {what} must be a JSON object, not {type(data).__name__}")
    return data


def _locate_adapter(spec: str | os.PathLike) -> tuple[dict[str, Any], Path | None]:
    """The adapter config and the directory that holds it (for adapter_model.safetensors)."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return _read_json_object(path, "adapter config"), path.parent
    if path.is_dir():
        config = path / "adapter_config.json"
        if not config.is_file():
            raise AttnprofError(f"{text}: directory has no adapter_config.json (not a PEFT adapter)")
        return _read_json_object(config, "adapter config"), path
    from .sources import resolve_source
    source = resolve_source(text)
    if source.kind != "adapter":
        raise AttnprofError(f"{text}: has no adapter_config.json (a model, not a PEFT adapter)")
    return _read_json_object(source.path / "adapter_config.json", "adapter config"), source.path


def load_adapter_config(spec: str | os.PathLike) -> dict[str, Any]:
    """The raw adapter config of an `adapter_config.json` file, an adapter directory or a cached
    hub id. Raises AttnprofError when it cannot be found or is not a JSON object."""
    return _locate_adapter(spec)[0]


def _plain_config(cfg: Any) -> dict[str, Any]:
    """A plain dict from a dict, a peft config object or any dataclass-like object."""
    if isinstance(cfg, Mapping):
        data = dict(cfg)
    elif hasattr(cfg, "to_dict"):
        data = dict(cfg.to_dict())
    elif hasattr(cfg, "__dict__"):
        data = dict(vars(cfg))
    else:
        raise AttnprofError(f"adapter config must be a mapping, not {type(cfg).__name__}")
    return {k: getattr(v, "value", v) if k in ("peft_type", "task_type") else v
            for k, v in data.items()}


class _Reader:
    """Typed access to the raw config: a wrong type becomes a config_invalid finding, not a crash."""

    def __init__(self, raw: dict[str, Any], findings: list[Finding]):
        self.raw = raw
        self.findings = findings

    def invalid(self, key: str, expected: str, severity: str = "error") -> None:
        value = repr(self.raw.get(key))
        value = value if len(value) <= 60 else value[:57] + "..."
        self.findings.append(Finding("config_invalid", severity,
                                     f"{key} = {value}: expected {expected}; peft cannot use it"))

    def number(self, key: str, default: float | None, positive: bool = False) -> float | None:
        value = self.raw.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.invalid(key, "a finite number")
            return None
        if positive and value <= 0:
            self.invalid(key, "a positive number")
            return None
        return float(value)

    def integer(self, key: str, default: int | None, positive: bool = False) -> int | None:
        value = self.raw.get(key, default)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.invalid(key, "an integer")
            return None
        if positive and value <= 0:
            self.invalid(key, "a positive integer")
            return None
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.raw.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.invalid(key, "true or false")
            return default
        return value

    def text(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is None or isinstance(value, str):
            return value
        self.invalid(key, "a string", severity="warning")
        return None

    def names(self, key: str, allow_regex: bool = True) -> list[str] | str | None:
        """A list of module names, a full-match regex string, or None."""
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            if not allow_regex:
                return [value]
            if value.lower() != ALL_LINEAR and _compile(value) is None:
                self.invalid(key, "a valid regular expression")
                return None
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(dict.fromkeys(value))
        self.invalid(key, "a list of module names or a regex string")
        return None

    def pattern(self, key: str) -> dict[str, Any]:
        """rank_pattern / alpha_pattern: {regex: value}; invalid regex keys are reported."""
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.invalid(key, "a mapping of module-name patterns to values")
            return {}
        bad = [k for k in value if _compile(rf"(.*\.)?({k})$") is None]
        if bad:
            self.invalid(key, f"valid regular expressions as keys (bad: {bad[0]!r})")
        return {k: v for k, v in value.items() if k not in bad}


@lru_cache(maxsize=512)
def _compile(pattern: str) -> re.Pattern[str] | None:
    """A compiled regex, or None when the pattern is invalid (cached: patterns repeat per module)."""
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return None


@dataclass
class AdapterSpec:
    """The config fields the check reads, normalised across peft versions and adapter types."""
    peft_type: str
    r: int | None = None
    alpha: float | None = None
    rslora: bool = False
    dora: bool = False
    targets: list[str] | str | None = None
    exclude: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    layers: list[int] | None = None
    layers_pattern: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    adaptive_ranks: dict[str, int] = field(default_factory=dict)
    target_r: int | None = None
    task_type: str | None = None
    base_name: str | None = None
    base_class: str | None = None
    bias: str = "none"
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    init: str | None = None
    feedforward: list[str] | str | None = None
    decompose_both: bool = False
    decompose_factor: int = -1
    save_projection: bool = True
    prompt: dict[str, Any] = field(default_factory=dict)
    peft_version: str | None = None


def parse_adapter_config(raw: dict[str, Any]) -> tuple[AdapterSpec, list[Finding]]:
    """Normalise a raw PEFT config (any version, any adapter type) and report what is wrong with it."""
    findings: list[Finding] = []
    rd = _Reader(raw, findings)
    peft_type = _parse_peft_type(raw, findings)
    spec = AdapterSpec(peft_type=peft_type)
    spec.task_type = rd.text("task_type")
    spec.base_name = rd.text("base_model_name_or_path")
    spec.peft_version = raw.get("peft_version") if isinstance(raw.get("peft_version"), str) else None
    mapping = raw.get("auto_mapping")
    if isinstance(mapping, dict) and isinstance(mapping.get("base_model_class"), str):
        spec.base_class = mapping["base_model_class"]

    legacy = [k for k in LEGACY_KEYS if k in raw]
    if legacy:
        findings.append(Finding("legacy_keys", "info", "; ".join(f"{k}: {LEGACY_KEYS[k]}" for k in legacy)))

    if peft_type in PROMPT_TYPES:
        for key in ("num_virtual_tokens", "token_dim", "num_layers", "num_transformer_submodules",
                    "encoder_hidden_size", "encoder_num_layers", "num_attention_heads"):
            spec.prompt[key] = rd.integer(key, None, positive=True)
        spec.prompt["prefix_projection"] = rd.flag("prefix_projection")
        spec.prompt["encoder_type"] = rd.text("encoder_reparameterization_type") or "MLP"
        return spec, findings

    spec.targets = rd.names("target_modules")
    spec.exclude = rd.names("exclude_modules")
    mts = rd.names("modules_to_save", allow_regex=False)
    spec.modules_to_save = list(mts) if isinstance(mts, list) else []
    _parse_layers(rd, spec)

    if peft_type == "ADALORA":
        spec.r = rd.integer("init_r", DEFAULT_R["ADALORA"], positive=True)
        spec.target_r = rd.integer("target_r", 8, positive=True)
        spec.alpha = rd.number("lora_alpha", DEFAULT_ALPHA)
        masks = raw.get("rank_pattern")
        if isinstance(masks, dict):
            spec.adaptive_ranks = {str(k): sum(1 for b in v if b is True) for k, v in masks.items()
                                   if isinstance(v, list)}
    elif peft_type in RANK_TYPES or peft_type not in KNOWN_PEFT_TYPES:
        default_r = DEFAULT_R.get(peft_type, 8)
        spec.r = rd.integer("r", default_r if peft_type in RANK_TYPES else None, positive=True)
        alpha_key = "alpha" if peft_type in ("LOHA", "LOKR") and "alpha" in raw else "lora_alpha"
        if peft_type in SCALED_TYPES or alpha_key in raw:
            spec.alpha = rd.number(alpha_key, DEFAULT_ALPHA)
        spec.rank_pattern = _numeric_pattern(rd, "rank_pattern", integer=True)
        spec.alpha_pattern = _numeric_pattern(rd, "alpha_pattern", integer=False)
    spec.rslora = rd.flag("use_rslora") and peft_type == "LORA"
    spec.dora = rd.flag("use_dora") and peft_type == "LORA"
    spec.fan_in_fan_out = rd.flag("fan_in_fan_out")
    spec.lora_bias = rd.flag("lora_bias")
    if spec.dora and spec.lora_bias:
        rd.invalid("lora_bias", "false when use_dora is true (peft does not support both)")
    bias = raw.get("bias", "none")
    if bias not in ("none", "all", "lora_only", None):
        rd.invalid("bias", "'none', 'all' or 'lora_only'")
    spec.bias = bias if bias in ("all", "lora_only") else "none"
    init = raw.get("init_lora_weights")
    spec.init = init.lower() if isinstance(init, str) else None
    if peft_type == "IA3":
        spec.feedforward = rd.names("feedforward_modules")
        if (isinstance(spec.feedforward, list) and isinstance(spec.targets, list)
                and not set(spec.feedforward) <= set(spec.targets)):
            rd.invalid("feedforward_modules", "a subset of target_modules")
    if peft_type == "LOKR":
        spec.decompose_both = rd.flag("decompose_both")
        spec.decompose_factor = rd.integer("decompose_factor", -1) or -1
    if peft_type == "VERA":
        spec.save_projection = rd.flag("save_projection", True)
    return spec, findings


def _parse_peft_type(raw: dict[str, Any], findings: list[Finding]) -> str:
    """The upper-case peft type; a missing, misspelt or unknown type is reported."""
    value = raw.get("peft_type")
    if value is None:
        guess = "LORA" if ("lora_alpha" in raw or "r" in raw) else "UNKNOWN"
        findings.append(Finding("config_invalid", "error",
                                f"no peft_type: PeftModel.from_pretrained cannot load this config "
                                f"(checked as {guess})"))
        return guess
    if not isinstance(value, str):
        findings.append(Finding("config_invalid", "error", f"peft_type = {value!r}: expected a string"))
        return "UNKNOWN"
    name = value.strip().upper().replace("-", "_")
    if name != value:
        findings.append(Finding("config_invalid", "warning",
                                f"peft_type {value!r} is not spelled as peft writes it ({name!r})"))
    if name not in KNOWN_PEFT_TYPES:
        findings.append(Finding("peft_type_unknown", "warning",
                                f"peft_type {name!r} is not a type attnprof knows: only its target "
                                "modules are checked"))
    return name


def _parse_layers(rd: _Reader, spec: AdapterSpec) -> None:
    """layers_to_transform / layers_pattern, with peft's rules on combining them."""
    layers = rd.raw.get("layers_to_transform")
    if isinstance(layers, bool):
        rd.invalid("layers_to_transform", "an integer or a list of integers")
    elif isinstance(layers, int):
        spec.layers = [layers]
    elif isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        spec.layers = list(layers) or None
    elif layers is not None:
        rd.invalid("layers_to_transform", "an integer or a list of integers")
    pattern = rd.raw.get("layers_pattern")
    if isinstance(pattern, str) and pattern:
        spec.layers_pattern = [pattern]
    elif isinstance(pattern, list) and all(isinstance(p, str) for p in pattern):
        spec.layers_pattern = [p for p in pattern if p]
    elif pattern not in (None, "", []):
        rd.invalid("layers_pattern", "a string or a list of strings")
    bad = [p for p in spec.layers_pattern if _compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") is None]
    if bad:
        rd.invalid("layers_pattern", "valid regular expressions")
        spec.layers_pattern = [p for p in spec.layers_pattern if p not in bad]
    if isinstance(spec.targets, str) and (spec.layers is not None or spec.layers_pattern):
        rd.invalid("layers_to_transform", "no layer selection when target_modules is a regex string")
    if spec.layers_pattern and spec.layers is None:
        rd.invalid("layers_pattern", "layers_to_transform to be set as well")


def _numeric_pattern(rd: _Reader, key: str, integer: bool) -> dict[str, Any]:
    """A rank_pattern / alpha_pattern with only usable numeric values kept."""
    out = {}
    for name, value in rd.pattern(key).items():
        ok = (isinstance(value, int) if integer else isinstance(value, (int, float)))
        if isinstance(value, bool) or not ok or not math.isfinite(value) or (integer and value <= 0):
            rd.invalid(key, f"{'positive integer' if integer else 'numeric'} values")
            continue
        out[name] = value
    return out


# --- scale ----------------------------------------------------------------------------------

def pattern_value(pattern: Mapping[str, Any] | None, module_name: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: the first key matching the end of the module name."""
    for key, value in (pattern or {}).items():
        regex = _compile(rf"(.*\.)?({key})$")
        if regex is not None and regex.match(module_name):
            return value
    return default


def _module_rank_alpha(spec: AdapterSpec, module_name: str | None) -> tuple[int | None, float | None]:
    """(r, alpha) for one module after rank_pattern / alpha_pattern; defaults without a name."""
    if module_name is None:
        return spec.r, spec.alpha
    return (pattern_value(spec.rank_pattern, module_name, spec.r),
            pattern_value(spec.alpha_pattern, module_name, spec.alpha))


def _scale(spec: AdapterSpec, module_name: str | None = None) -> float | None:
    """The effective scale of one module (or the default), None for types without alpha/r."""
    if spec.peft_type not in SCALED_TYPES:
        return None
    r, alpha = _module_rank_alpha(spec, module_name)
    if r is None or alpha is None or r <= 0:
        return None
    if spec.peft_type == "ADALORA":
        return (alpha if alpha > 0 else r) / r
    return alpha / math.sqrt(r) if spec.rslora else alpha / r


def adapter_scale(cfg: Any, module_name: str | None = None) -> float:
    """The factor that multiplies the low-rank update of `module_name` (alpha/r; alpha/sqrt(r) with
    rsLoRA; per module with rank_pattern/alpha_pattern). Without a module name: the default scale.
    `cfg` is a raw adapter config dict or a peft config object. AttnprofError for adapter types
    without an alpha/r scale (prompt tuning, IA3, VeRA...) or an unusable r/alpha."""
    spec, _ = parse_adapter_config(_plain_config(cfg))
    value = _scale(spec, module_name)
    if value is None:
        raise AttnprofError(f"{spec.peft_type} adapter has no alpha/r scale"
                            if spec.peft_type not in SCALED_TYPES else "adapter r/alpha are not usable")
    return value


# --- the base architecture (meta device) ----------------------------------------------------

@dataclass(frozen=True)
class _Module:
    """One module of the base skeleton."""
    name: str
    kind: str                       # linear | conv1d_t | embedding | conv | mha | other
    in_features: int | None         # embedding: num_embeddings
    out_features: int | None        # embedding: embedding_dim
    attention: bool                 # inside an attention block
    params: tuple[tuple[str, tuple[int, ...]], ...]   # this module's own parameters and shapes
    numel: int                      # all parameters below it


@dataclass
class _Arch:
    """The base skeleton: its modules and the sizes the checks need."""
    modules: dict[str, _Module]
    output_name: str | None
    num_layers: int | None
    vocab_size: int | None
    hidden_size: int | None
    kv_dim: int | None
    total_params: int
    model_class: str


@dataclass
class _Base:
    """A resolved base model: how to show it, its name, and its skeleton (or why there is none)."""
    label: str                      # what to print
    name: str | None                # for comparing with base_model_name_or_path
    model_type: str | None = None
    quant: str | None = None        # why the base counts as quantised
    arch: _Arch | None = None
    problem: str | None = None      # why the architecture could not be built


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' info logs and Python warnings while configs and skeletons are built."""
    import transformers
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)


def _config_from_dict(data: dict[str, Any]):
    """A transformers config from a config.json dict; None when the model_type is not built in."""
    from transformers import CONFIG_MAPPING
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return None
    with _quiet_transformers():
        return CONFIG_MAPPING[model_type].from_dict(dict(data))


def _load_base(base: Any) -> tuple[_Base, Any]:
    """Resolve BASE (path, cached hub id, config.json, config object or model) to a description and
    its transformers config (None when the architecture cannot be built)."""
    import torch
    from transformers import PretrainedConfig

    if isinstance(base, torch.nn.Module):
        cfg = getattr(base, "config", None)
        info = _base_from_config(cfg, label=type(base).__name__, name=getattr(cfg, "_name_or_path", None) or None)
        info.arch = _inspect(base)
        return info, cfg
    if isinstance(base, PretrainedConfig):
        return _base_from_config(base, label=f"{type(base).__name__} object",
                                 name=getattr(base, "_name_or_path", None) or None), base
    text = str(base)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".json":
        return _base_from_config_file(path, label=text, name=path.resolve().parent.name)
    from .sources import resolve_source
    source = resolve_source(text)
    if source.kind == "adapter":
        raise AttnprofError(f"{text}: BASE is a PEFT adapter directory; give the base model it was trained on")
    name = _dir_model_name(source.path) if path.exists() else text
    if source.kind == "gguf":
        return _base_from_gguf(source.path, label=text, name=name)
    config = source.config_dir / "config.json"
    if not config.is_file():
        raise AttnprofError(f"{text}: no config.json")
    return _base_from_config_file(config, label=text, name=name)


def _dir_model_name(path: Path) -> str:
    """org/name for a Hugging Face cache snapshot directory, else the directory (or file) name."""
    match = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots", str(path))
    return f"{match.group(1)}/{match.group(2)}" if match else path.name


def _base_from_config_file(path: Path, label: str, name: str | None) -> tuple[_Base, Any]:
    """Describe a base from its config.json; the config object is None if it cannot be built."""
    data = _read_json_object(path, "base config")
    qc = data.pop("quantization_config", None)
    quant = (f"its config has quantization_config (quant_method={qc.get('quant_method', '?')})"
             if isinstance(qc, dict) else None)
    model_type = data.get("model_type") if isinstance(data.get("model_type"), str) else None
    try:
        cfg = _config_from_dict(data)
    except Exception as exc:          # transformers validates configs with many exception types
        info = _Base(label, name, model_type=model_type, quant=quant)
        info.problem = f"its config.json is not usable by transformers ({type(exc).__name__})"
        return info, None
    if cfg is None:
        info = _Base(label, name, model_type=model_type, quant=quant)
        info.problem = (f"model_type {data.get('model_type')!r} is not built into transformers "
                        "(custom code is never run)")
        return info, None
    info = _base_from_config(cfg, label, name)
    info.quant = info.quant or quant
    return info, cfg


def _base_from_gguf(path: Path, label: str, name: str | None) -> tuple[_Base, Any]:
    """Describe a GGUF base from its header (transformers reads the metadata only)."""
    from transformers import AutoConfig
    try:
        with _quiet_transformers():
            cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:          # gguf parsing raises many types
        raise AttnprofError(f"{label}: cannot read the GGUF header ({type(exc).__name__})") from None
    info = _base_from_config(cfg, label, name)
    info.quant = f"it is a GGUF file ({path.name}), usually quantised"
    return info, cfg


def _base_from_config(cfg: Any, label: str, name: str | None) -> _Base:
    """Describe a base from a transformers config object."""
    info = _Base(label, name)
    if cfg is None:
        info.problem = "it has no transformers config"
        return info
    info.model_type = getattr(cfg, "model_type", None)
    qc = getattr(cfg, "quantization_config", None)
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        info.quant = f"its config has quantization_config (quant_method={getattr(method, 'value', method)})"
    return info


def _build_arch(info: _Base, cfg: Any, task_type: str | None) -> None:
    """Build the model skeleton on the meta device and record its modules (cached per config)."""
    auto_name = TASK_AUTO_CLASS.get(task_type or "", "AutoModelForCausalLM")
    try:
        text = cfg.to_json_string(use_diff=False)
    except Exception:                 # a config that cannot serialise cannot be cached; build directly
        text = None
    try:
        info.arch = _arch_cached(text, auto_name) if text else _arch_uncached(cfg, auto_name)
    except Exception as exc:          # from_config raises many types for odd configs
        info.problem = f"transformers could not build it from its config ({type(exc).__name__}: {str(exc)[:80]})"


@lru_cache(maxsize=16)
def _arch_cached(config_json: str, auto_name: str) -> _Arch:
    """The skeleton of a config given as JSON text (so repeated checks reuse it)."""
    data = json.loads(config_json)
    cfg = _config_from_dict(data)
    if cfg is None:
        raise ValueError(f"model_type {data.get('model_type')!r} unknown")
    return _arch_uncached(cfg, auto_name)


def _arch_uncached(cfg: Any, auto_name: str) -> _Arch:
    """Build the model class for the task on the meta device and inspect it."""
    import torch
    import transformers
    if getattr(cfg, "quantization_config", None) is not None:
        cfg = type(cfg).from_dict({k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
    with _quiet_transformers(), torch.device("meta"):
        try:
            model = getattr(transformers, auto_name).from_config(cfg)
        except ValueError:
            model = transformers.AutoModel.from_config(cfg)
    return _inspect(model)


def _inspect(model: Any) -> _Arch:
    """Names, kinds and shapes of every module of a (meta) model."""
    import torch
    from transformers.pytorch_utils import Conv1D
    classes = {name: type(mod).__name__ for name, mod in model.named_modules()}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_name = None
    modules: dict[str, _Module] = {}
    for name, mod in model.named_modules():
        if not name:
            continue
        if mod is output and output_name is None:
            output_name = name
        in_f = out_f = None
        if isinstance(mod, torch.nn.Linear):
            kind, in_f, out_f = "linear", mod.in_features, mod.out_features
        elif isinstance(mod, Conv1D):
            kind, (in_f, out_f) = "conv1d_t", tuple(mod.weight.shape)
        elif isinstance(mod, torch.nn.Embedding):
            kind, in_f, out_f = "embedding", mod.num_embeddings, mod.embedding_dim
        elif isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            kind = "conv"
        elif isinstance(mod, torch.nn.MultiheadAttention):
            kind = "mha"
        else:
            kind = "other"
        parts = name.split(".")
        attention = any(re.search(r"attn|attention", classes.get(".".join(parts[:i]), ""), re.I)
                        for i in range(1, len(parts)))
        params = tuple((p, tuple(t.shape)) for p, t in mod.named_parameters(recurse=False))
        numel = sum(t.numel() for t in mod.parameters())
        modules[name] = _Module(name, kind, in_f, out_f, attention, params, numel)
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    hidden = getattr(text_cfg, "hidden_size", None)
    heads = getattr(text_cfg, "num_attention_heads", None)
    kv_heads = getattr(text_cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(text_cfg, "head_dim", None) or (hidden // heads if hidden and heads else None)
    return _Arch(
        modules=modules, output_name=output_name,
        num_layers=_int_or_none(getattr(text_cfg, "num_hidden_layers", None)),
        vocab_size=_int_or_none(getattr(text_cfg, "vocab_size", None)),
        hidden_size=_int_or_none(hidden),
        kv_dim=_int_or_none(head_dim * kv_heads) if head_dim and kv_heads else None,
        total_params=sum(p.numel() for p in model.parameters()),
        model_class=type(model).__name__,
    )


def _int_or_none(value: Any) -> int | None:
    """An int config value, or None for anything else."""
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


# --- matching targets (PEFT semantics) --------------------------------------------------------

def _entry_matches(entry: str, name: str) -> bool:
    """PEFT list matching: an entry names the module itself or a suffix after a '.'."""
    return name == entry or name.endswith("." + entry)


def _name_matches(entries: list[str] | str, name: str) -> bool:
    """PEFT name matching: a regex string must match the whole name; a list uses `_entry_matches`."""
    if isinstance(entries, str):
        regex = _compile(entries)
        return bool(regex and regex.fullmatch(name))
    return any(_entry_matches(e, name) for e in entries)


def _layer_index(spec: AdapterSpec, name: str) -> int | None:
    """The decoder-layer index PEFT reads from a module name (first numbered segment)."""
    if not spec.layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in spec.layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def _excluded(spec: AdapterSpec, name: str) -> bool:
    """True when peft skips the module: exclude_modules, or inside a modules_to_save module."""
    if spec.exclude and _name_matches(spec.exclude, name):
        return True
    for m in spec.modules_to_save:
        regex = _compile(rf"(^|.*\.){m}($|\..*)")
        if regex is not None and regex.match(name):
            return True
    return False


@dataclass
class _Match:
    """The outcome of matching target_modules against the base's module names."""
    matched: list[str]
    unmatched: list[str]              # target entries that name no module at all
    filtered_by_layer: int            # modules dropped by layers_to_transform
    all_linear: list[str]             # the modules "all-linear" would pick


def _all_linear(arch: _Arch, task_type: str | None) -> list[str]:
    """The modules peft's 'all-linear' picks: every Linear/Conv1D except the output layer."""
    drop = {arch.output_name} if arch.output_name else set()
    if not drop and task_type == "SEQ_CLS":
        drop = {n for n in ("score", "classifier") if n in arch.modules}
    return [n for n, m in arch.modules.items() if m.kind in ("linear", "conv1d_t") and n not in drop]


def _match(spec: AdapterSpec, arch: _Arch, targets: list[str] | str) -> _Match:
    """Which modules the targets pick, which target entries name nothing, and what layers dropped."""
    all_linear = _all_linear(arch, spec.task_type)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        matched = [n for n in all_linear if not _excluded(spec, n)]
        return _Match(matched, [] if matched else [ALL_LINEAR], 0, all_linear)
    matched: list[str] = []
    hit: set[str] = set()
    dropped = 0
    for name in arch.modules:
        if isinstance(targets, str):
            if _name_matches(targets, name):
                hit.add(targets)
                if not _excluded(spec, name):
                    matched.append(name)
            continue
        entries = [e for e in targets if _entry_matches(e, name)]
        if not entries:
            continue
        hit.update(entries)
        if _excluded(spec, name):
            continue
        if name not in targets and spec.layers is not None:
            index = _layer_index(spec, name)
            if index is None or index not in spec.layers:
                dropped += 1
                continue
        matched.append(name)
    entries = [targets] if isinstance(targets, str) else targets
    return _Match(matched, [e for e in entries if e not in hit], dropped, all_linear)


# --- per-module adapter tensors -----------------------------------------------------------------

def _factorize(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LoKr's split of a dimension into m * n (m <= n): the divisor pair nearest sqrt, m capped at
    `factor`; a positive factor that divides the dimension is used as m directly."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    cap = dimension if factor == -1 else factor
    m, n = 1, dimension
    candidate = 2
    while m < n and candidate <= dimension:
        if dimension % candidate == 0:
            if candidate + dimension // candidate > m + n or candidate > cap:
                break
            m, n = candidate, dimension // candidate
        candidate += 1
    return (m, n) if m <= n else (n, m)


def _module_tensors(spec: AdapterSpec, mod: _Module, is_feedforward: bool) -> dict[str, tuple[int, ...]] | None:
    """The trainable tensors the adapter adds to one module, with shapes; None when not modelled."""
    in_f, out_f = mod.in_features, mod.out_features
    if in_f is None or out_f is None:
        return None
    r, _ = _module_rank_alpha(spec, mod.name)
    t = spec.peft_type
    if t == "IA3":
        return {"ia3_l": (1, in_f) if is_feedforward else (out_f, 1)}
    if r is None:
        return None
    if t == "LORA":
        if mod.kind == "embedding":
            out = {"lora_embedding_A": (r, in_f), "lora_embedding_B": (out_f, r)}
        else:
            out = {"lora_A.weight": (r, in_f), "lora_B.weight": (out_f, r)}
            if spec.lora_bias:
                out["lora_B.bias"] = (out_f,)
        if spec.dora:
            out["lora_magnitude_vector"] = (out_f,)
        return out
    if t == "ADALORA":
        return {"lora_A": (r, in_f), "lora_B": (out_f, r), "lora_E": (r, 1)}
    if t == "LOHA":
        return {"hada_w1_a": (out_f, r), "hada_w1_b": (r, in_f),
                "hada_w2_a": (out_f, r), "hada_w2_b": (r, in_f)}
    if t == "LOKR":
        (a, b), (c, d) = _factorize(out_f, spec.decompose_factor), _factorize(in_f, spec.decompose_factor)
        out = {}
        if spec.decompose_both and r < max(a, c) / 2:
            out.update({"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)})
        else:
            out["lokr_w1"] = (a, c)
        if r < max(b, d) / 2:
            out.update({"lokr_w2_a": (b, r), "lokr_w2_b": (r, d)})
        else:
            out["lokr_w2"] = (b, d)
        return out
    if t == "VERA":
        return {"vera_lambda_b": (out_f,), "vera_lambda_d": (r,)}
    return None


def _numel(shape: Iterable[int]) -> int:
    """Number of elements of a shape."""
    return math.prod(int(s) for s in shape)


def _prompt_trainable(spec: AdapterSpec, arch: _Arch | None) -> int | None:
    """Trainable parameters of prompt/prefix/p-tuning from the config (base fills gaps)."""
    p = spec.prompt
    tokens = p.get("num_virtual_tokens")
    dim = p.get("token_dim") or (arch.hidden_size if arch else None)
    layers = p.get("num_layers") or (arch.num_layers if arch else None)
    total = tokens * (p.get("num_transformer_submodules") or 1) if tokens else None
    if total is None or dim is None:
        return None
    hidden = p.get("encoder_hidden_size") or dim
    if spec.peft_type == "PROMPT_TUNING":
        return total * dim
    if spec.peft_type == "PREFIX_TUNING":
        if layers is None:
            return None
        width = layers * 2 * dim
        if p.get("prefix_projection"):
            return total * dim + (dim * hidden + hidden) + (hidden * width + width)
        return total * width
    if spec.peft_type == "P_TUNING":
        if str(p.get("encoder_type")).upper() == "LSTM":
            depth = p.get("encoder_num_layers") or 2
            lstm = sum(2 * (4 * hidden * ((dim if i == 0 else 2 * hidden) + hidden) + 8 * hidden)
                       for i in range(depth))
            head = (2 * hidden) * (2 * hidden) + 2 * hidden + (2 * hidden) * dim + dim
            return total * dim + lstm + head
        return total * dim + (dim * hidden + hidden) + (hidden * hidden + hidden) + (hidden * dim + dim)
    return None


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
    for key in names:
        r = spec.rank_pattern.get(key, spec.r)
        alpha = spec.alpha_pattern.get(key, spec.alpha)
        if r and alpha is not None:
            scales[key] = alpha / math.sqrt(r) if spec.rslora else alpha / r
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
