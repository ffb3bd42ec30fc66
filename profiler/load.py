"""Load: a causal LM and its tokenizer from a resolved source, checked before any weight is read.

Checks that turn into one clear line (exit 2): not a causal LM, unreadable or corrupt safetensors,
a .gguf transformers cannot read, an adapter whose base is missing. PEFT adapter directories are
merged onto their base with peft's `merge_and_unload`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import AttnprofError, first_line
from .sources import ModelSource, resolve_source

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ModelInfo:
    """What profile.json records about a model (architecture facts, not weights)."""
    name: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float | None
    max_positions: int | None
    source: str
    sliding_window: int | None = None
    dtype: str = ""
    quantization: str | None = None

    def shape_key(self) -> tuple:
        """What two models must share to be compared head by head."""
        return (self.architecture, self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo
    source: ModelSource
    extras: dict = field(default_factory=dict)


def rope_theta(config) -> float | None:
    """The RoPE base of a config (transformers 5 keeps it in rope_parameters), None without RoPE."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    if isinstance(params, dict):
        for sub in params.values():          # per-layer-type dicts (e.g. full/sliding attention)
            if isinstance(sub, dict) and "rope_theta" in sub:
                return float(sub["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None else None


def model_info(config, name: str, source: str, dtype: str = "", quantization: str | None = None) -> ModelInfo:
    cfg = config.get_text_config()
    heads = int(cfg.num_attention_heads)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    archs = getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "ForCausalLM")]
    return ModelInfo(
        name=name, architecture=archs[0], num_layers=int(cfg.num_hidden_layers), num_heads=heads,
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads), head_dim=head_dim,
        rope_theta=rope_theta(cfg), max_positions=getattr(cfg, "max_position_embeddings", None),
        source=source, sliding_window=getattr(cfg, "sliding_window", None), dtype=dtype,
        quantization=quantization)


def check_safetensors(directory: Path) -> None:
    """Open every safetensors header in a directory; a broken one gives a one-line error."""
    from safetensors import safe_open
    files = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError) as exc:
            raise AttnprofError(f"{index}: unreadable shard index ({exc.__class__.__name__})")
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            raise AttnprofError(f"{directory}: shard {missing[0]} listed in the index is missing")
    if not files and not list(directory.glob("*.bin")):
        raise AttnprofError(f"{directory}: no weights (*.safetensors) found")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                keys = list(fh.keys())
                if keys:
                    fh.get_slice(keys[-1]).get_shape()
            size = f.stat().st_size
            with open(f, "rb") as raw:
                header_len = int.from_bytes(raw.read(8), "little")
                header = json.loads(raw.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end > size:
                raise ValueError("file is truncated")
        except Exception as exc:
            reason = first_line(exc)
            raise AttnprofError(f"{f}: unreadable or corrupt safetensors ({reason})") from None


def load_config(source: ModelSource):
    """The transformers config of a source, refusing anything that is not a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        if source.kind == "gguf":
            config = AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name)
        else:
            config = AutoConfig.from_pretrained(source.path)
    except Exception as exc:
        reason = first_line(exc)
        raise AttnprofError(f"{source.spec}: cannot read the model config ({reason})") from None
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(CAUSAL_SUFFIXES) for a in archs):
        raise AttnprofError(f"{source.spec}: not a causal LM (architecture {archs[0]})")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or getattr(config, "is_encoder_decoder", False):
        raise AttnprofError(f"{source.spec}: not a causal LM (model type {config.model_type})")
    return config


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise AttnprofError(f"unknown dtype {dtype!r} (auto, float32, bfloat16, float16)")
    chosen = DTYPES[dtype]
    if chosen is None:
        chosen = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return chosen


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AttnprofError("--device cuda asked for, but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise AttnprofError(f"unknown device {device!r} (auto, cpu, cuda)")
    return device


def quantization_config(load_in_4bit: bool, load_in_8bit: bool):
    """bitsandbytes NF4 with double quantisation and bf16 compute (QLoRA's recipe), or 8-bit."""
    if not (load_in_4bit or load_in_8bit):
        return None
    if load_in_4bit and load_in_8bit:
        raise AttnprofError("load in 4-bit or in 8-bit, not both")
    from transformers import BitsAndBytesConfig
    if load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer
    try:
        if source.kind == "gguf":
            return AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
        return AutoTokenizer.from_pretrained(source.path)
    except Exception as exc:
        reason = first_line(exc)
        raise AttnprofError(f"{source.spec}: cannot load its tokenizer ({reason})") from None


def load_model(spec: str | ModelSource, *, attn_implementation: str, device: str = "auto",
               dtype: str = "auto", base: str | ModelSource | None = None, load_in_4bit: bool = False,
               load_in_8bit: bool = False, device_map: str | None = None) -> LoadedModel:
    """Load a causal LM (or merge an adapter onto `base`) ready for capture."""
    from transformers import AutoModelForCausalLM
    source = spec if isinstance(spec, ModelSource) else resolve_source(spec)
    if source.kind == "adapter":
        if base is None:
            raise AttnprofError(f"{source.spec} is a PEFT adapter: profile it as `BASE vs {source.spec}`")
        return merge_adapter(base, source, attn_implementation=attn_implementation, device=device,
                             dtype=dtype, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                             device_map=device_map)
    device = resolve_device(device)
    config = load_config(source)
    if source.kind in ("dir", "demo"):
        check_safetensors(source.path)
    torch_dtype = resolve_dtype(dtype, device)
    quant = quantization_config(load_in_4bit, load_in_8bit)
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, attn_implementation=attention_for(config, attn_implementation))
    if quant is not None:
        kwargs["quantization_config"] = quant
        # bitsandbytes places weights at load time: on the asked GPU (not spread over all of them)
        # unless --device-map says otherwise
        on_gpu = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device
        kwargs["device_map"] = device_map or ({"": on_gpu} if device.startswith("cuda") else device)
    elif device_map:
        kwargs["device_map"] = device_map
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.path.name
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(source.path.parent if source.kind == "gguf"
                                                              else source.path, output_loading_info=True, **kwargs)
    except AttnprofError:
        raise
    except Exception as exc:
        reason = first_line(exc)
        raise AttnprofError(f"{source.spec}: cannot load the model ({reason})") from None
    missing = sorted(loading.get("missing_keys") or [])
    if missing:            # transformers would fill them with random values: a different model
        raise AttnprofError(f"{source.spec}: {len(missing)} weight(s) missing from the checkpoint "
                            f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})")
    if quant is None and not device_map:
        model = model.to(device)
    model.eval()
    quant_name = ("nf4" if load_in_4bit else "int8") if quant is not None else None
    info = model_info(model.config, source.name, source.spec, str(torch_dtype).replace("torch.", ""),
                      quant_name)
    return LoadedModel(model, load_tokenizer(source), info, source)


def attention_for(config: Any, wanted: str) -> str:
    """The attention implementation to load with: `wanted`, except for model classes that compute
    attention themselves (Falcon), which refuse any name but their own at load; they load eager,
    and capture reads the weights eager attention returns."""
    from transformers import AutoModelForCausalLM
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return wanted
    can_set = getattr(model_class, "_can_set_attn_implementation", None)
    return wanted if can_set is None or can_set() else "eager"


def merge_adapter(base: str | ModelSource, adapter: ModelSource, *, attn_implementation: str,
                  device: str = "auto", dtype: str = "auto", load_in_4bit: bool = False,
                  load_in_8bit: bool = False, device_map: str | None = None) -> LoadedModel:
    """Load BASE (quantised or placed as asked), apply the PEFT adapter with peft and merge it
    (W = W0 + scale·B·A; into a 4-/8-bit base peft de-quantises, adds and re-quantises)."""
    from peft import PeftModel
    loaded = load_model(base, attn_implementation=attn_implementation, device=device, dtype=dtype,
                        load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, device_map=device_map)
    try:
        merged = PeftModel.from_pretrained(loaded.model, str(adapter.path)).merge_and_unload()
    except Exception as exc:
        reason = first_line(exc)
        raise AttnprofError(f"{adapter.spec}: adapter does not apply to base {loaded.source.spec} "
                            f"({reason})") from None
    info = loaded.info
    info.name, info.source = adapter.name, adapter.spec
    tokenizer = loaded.tokenizer
    if any(adapter.path.glob("tokenizer*.json")):
        tokenizer = load_tokenizer(adapter)
    return LoadedModel(merged.eval(), tokenizer, info, adapter, {"base_source": loaded.source})
