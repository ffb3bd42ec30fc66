"""Shared fixtures: tiny random-weight models (no downloads) and the real demo model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(kind: str = "llama", **overrides):
    """A small random-weight decoder config; GQA when num_key_value_heads < num_attention_heads."""
    from transformers import Gemma2Config, Llama4TextConfig, LlamaConfig, MistralConfig, Qwen2Config
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                rope_theta=10000.0, tie_word_embeddings=False)
    if kind == "llama4":       # chunked attention on RoPE layers; small experts
        base.update(head_dim=16, intermediate_size_mlp=128, num_local_experts=2, num_experts_per_tok=1)
    if kind == "gemma2":       # attention logit softcapping (50 by default), sliding layers
        base.update(head_dim=16, sliding_window=32)
    base.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "llama4": Llama4TextConfig,
           "gemma2": Gemma2Config}[kind]
    return cls(**base)


def tiny_model(kind: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    config = tiny_config(kind, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                             dtype=torch.float32)
    # random init is near-uniform attention; sharpen q/k so profiles have structure
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
    return model.eval()


def random_qk(batch: int, heads: int, kv_heads: int, length: int, dim: int,
              seed: int = 0, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Query/key inputs whose logits have std ≈ spread, so attention is far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, length, dim, generator=gen) * spread
    key = torch.randn(batch, kv_heads, length, dim, generator=gen)
    return query, key


def causal_logsumexp(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """log Σ_j exp(score_ij) over each query's visible keys, (B, H, T) fp32, from fp32 scores
    (GQA keys unexpanded): what a fused attention (cuDNN, flash) returns beside its output."""
    keys = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = query.float() @ keys.transpose(-1, -2) * scaling
    length = query.shape[2]
    hidden = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
    return scores.masked_fill(hidden, float("-inf")).logsumexp(-1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a shared 2-core machine, 2 OpenMP threads stall whenever another
    process holds a core, which makes small linear algebra tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once from the bundled GGUF."""
    from profiler.demo_model import demo_model_dir
    return demo_model_dir()


TINY_CORPUS = ("attention decays with distance in many heads of a language model. "
               "low rank adapters change a few directions of the weights. ") * 20


def tiny_tokenizer(vocab_size: int = 300, eos: str = "<eos>"):
    """A small byte-level BPE trained on a fixed sentence (no downloads, deterministic); `eos`
    names its one special token (id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TINY_CORPUS], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)


def save_tiny(path: Path, kind: str = "llama", seed: int = 0, dtype=torch.float32, tokenizer=None,
              **overrides) -> Path:
    """A tiny random-weight causal LM directory (config, safetensors, tokenizer)."""
    model = tiny_model(kind, seed=seed, **overrides)
    model.config.architectures = [type(model).__name__]
    model.to(dtype).save_pretrained(path)
    (tokenizer or tiny_tokenizer(model.config.vocab_size)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama", num_key_value_heads=2)


def int8_beside_full(path: Path, device: str):
    """The tail capture of a saved tiny model loaded with bitsandbytes LLM.int8 (`--load-in-8bit`)
    and in fp32, on the same device and probes, with the 8-bit model's Linear8bitLt layers."""
    import bitsandbytes as bnb
    import numpy as np
    from profiler import capture as cap
    from profiler.load import load_model
    cap.register()
    ids = np.random.default_rng(9).integers(0, 300, size=(2, 128))
    captures, layers = [], []
    for int8 in (True, False):
        loaded = load_model(str(path), attn_implementation=cap.ATTN_NAME, device=device, dtype="float32",
                            load_in_8bit=int8)
        if int8:
            assert loaded.info.quantization == "int8"
            layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
        captures.append(cap.capture(loaded.model, ids, window=16).A)
    return captures[0], captures[1], layers
