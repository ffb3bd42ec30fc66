"""The base model skeleton for the adapter check: the base architecture built from its config on
the meta device (no weights, no allocation), target matching with PEFT's own rules, and the
tensors an adapter adds to each matched module.

Split out of `profiler.adapter`, which keeps the checks and the report: this is the part that
builds models with transformers and answers which base modules an adapter touches.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

from .adapter_config import ALL_LINEAR, AdapterSpec, _compile, _module_rank_alpha, _read_json_object
from .errors import AttnprofError

# --- the base architecture (meta device) ----------------------------------------------------

TASK_AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel",
}


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
