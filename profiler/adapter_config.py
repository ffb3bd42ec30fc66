"""Reading and parsing a PEFT adapter config: the vocabulary of peft types and finding codes,
`Finding`, `load_adapter_config`, `parse_adapter_config` (any peft version, any adapter type, into
an `AdapterSpec`) and the effective alpha/r scale (`adapter_scale`, `pattern_value`).

Kept apart from the checker (`profiler.adapter`) so that code which only needs the config, such as
the weight diff's rank/alpha pattern lookup, does not import the checker or transformers.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from .errors import AttnprofError

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
# Defaults of the peft config classes, used when an (old or hand-written) config omits a key.
DEFAULT_R = {"LORA": 8, "LOHA": 8, "LOKR": 8, "VERA": 256, "ADALORA": 12}
DEFAULT_ALPHA = 8.0

LEGACY_KEYS = {
    "enable_lora": "peft<0.3 MergedLinear switch (which slices of a fused qkv get LoRA); "
                   "modern peft ignores it and adapts the whole fused projection",
    "merge_weights": "peft<0.3 merge-on-eval flag; modern peft ignores it (merge explicitly)",
}


# --- results --------------------------------------------------------------------------------

@dataclass
class Finding:
    """One observation about the adapter: a stable `code`, a `severity` and a readable message."""
    code: str
    severity: str
    message: str


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
