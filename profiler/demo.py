"""The demo: two fine-tunes of the bundled SmolLM2-135M-Instruct, each profiled against its base.

1. *trained LoRA* — a real peft LoRA (r=8, alpha=16, q_proj+v_proj) trained on the text:stdlib
   corpus, merged with `merge_and_unload()` and saved in bf16, as users ship it. A gentle fine-tune;
   its verdict is borderline (README: What the demo shows).
2. *sharpening adapter* — a synthetic rank-8 LoRA on q_proj, constructed (not trained) as
   ΔW_q = c·U_r·U_rᵀ·W_q on the top-r left singular subspace of each W_q: it scales the strongest
   query directions by (1 + c), sharpening attention. Saved as a PEFT adapter directory and
   merged by attnprof itself: a clear regression.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .demo_model import cache_root, demo_model_dir
from .io import atomic_dir

LORA_RANK, LORA_ALPHA, LORA_TARGETS = 8, 16, ("q_proj", "v_proj")
SHARPEN_RANK = 8
SHARPEN_GAIN = 0.5          # c: top-8 query directions scaled by 1 + c (c = 0.25 already fails the gate at T=512)


@dataclass(frozen=True)
class DemoSettings:
    steps: int
    batch: int
    seq_len: int
    lr: float
    length: int              # probe length T
    num: int                 # probes


# lr 2e-4 is the usual LoRA learning rate (QLoRA's default). At lr 1e-3 on this small pool the
# merged model fails the gate (measured: 37% of heads shifted at T=512): a finding, not a bug.
FULL = DemoSettings(steps=50, batch=2, seq_len=128, lr=2e-4, length=2048, num=8)
QUICK = DemoSettings(steps=50, batch=1, seq_len=96, lr=2e-4, length=512, num=4)
TRAIN_POOL = 32             # training windows: a small fixed pool of text:stdlib, cycled


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def train_lora(base_dir: Path, target: Path, settings: DemoSettings, seed: int = 0,
               quiet: bool = False) -> list[float]:
    """Train a LoRA with peft on text:stdlib, merge it and save the merged model in bf16."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .probes import corpus_text, tokenize_corpus

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS),
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    ids = tokenize_corpus(corpus_text("text:stdlib")[:400_000], tokenizer)
    rng = np.random.default_rng(seed)
    pool = np.stack([ids[s:s + settings.seq_len]
                     for s in rng.integers(0, len(ids) - settings.seq_len, size=TRAIN_POOL)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    held = torch.as_tensor(pool[:4])

    def held_loss() -> float:
        """Loss on a fixed batch of the training pool: the curve that must fall."""
        model.eval()
        with torch.no_grad():
            value = model(input_ids=held, labels=held).loss.item()
        model.train()
        return value

    model.train()
    losses, curve = [], [(0, held_loss())]
    _log(f"  step   0/{settings.steps}  loss on a fixed batch {curve[0][1]:.3f}", quiet)
    for step in range(1, settings.steps + 1):
        rows = [(step * settings.batch + i) % TRAIN_POOL for i in range(settings.batch)]
        batch = torch.as_tensor(pool[rows])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0 or step == settings.steps:
            curve.append((step, held_loss()))
            _log(f"  step {step:3d}/{settings.steps}  loss on a fixed batch {curve[-1][1]:.3f}  "
                 f"(training loss, mean of last 10: {np.mean(losses[-10:]):.3f})", quiet)
    merged = model.merge_and_unload()
    with atomic_dir(target) as tmp:
        merged.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "training_log.json").write_text(json.dumps({"losses": losses, "fixed_batch_loss": curve,
                                                           "settings": vars(settings),
                                                           "lora": {"r": LORA_RANK, "alpha": LORA_ALPHA,
                                                                    "targets": list(LORA_TARGETS)}}))
    return losses


def sharpening_adapter(base_dir: Path, target: Path, gain: float = SHARPEN_GAIN,
                       rank: int = SHARPEN_RANK) -> Path:
    """Write a synthetic PEFT LoRA adapter with ΔW_q = gain·U_r·U_rᵀ·W_q for every layer's q_proj.

    As LoRA factors: B = gain·U_r (out×r), A = U_rᵀ·W_q (r×in), lora_alpha = r so scale = 1."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as fh:
        names = sorted(k for k in fh.keys() if k.endswith("self_attn.q_proj.weight"))
        for name in names:
            w = fh.get_tensor(name).double()
            u = torch.linalg.svd(w, full_matrices=False).U[:, :rank]
            prefix = "base_model.model." + name[: -len(".weight")]
            tensors[f"{prefix}.lora_A.weight"] = (u.T @ w).float().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = (gain * u).float().contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
              "target_modules": ["q_proj"], "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "inference_mode": True,
              "base_model_name_or_path": str(base_dir)}
    with atomic_dir(target) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (tmp / "README.md").write_text(f"Synthetic adapter made by attnprof's demo: constructed, not trained.\n"
                                       f"ΔW_q = {gain}·U_r·U_rᵀ·W_q on the top-{rank} left singular subspace "
                                       "of every q_proj weight (scale alpha/r = 1).\n")
    return target


def run_demo(out: Path, quick: bool = False, quiet: bool = False) -> int:
    """Build both fine-tunes (cached), run base vs each, write reports; 0 once both reports exist.

    The verdicts are the demo's findings, not its exit status: it says plainly when they differ
    from the expected pair (trained LoRA passes, sharpening adapter fails)."""
    from . import run
    from .cli import diff_summary
    from .rules import GateThresholds

    settings = QUICK if quick else FULL
    t0 = time.time()
    _log("[1/4] demo base model: SmolLM2-135M-Instruct (bundled GGUF → cached safetensors)", quiet)
    base = demo_model_dir()
    work = cache_root() / "demo" / ("quick" if quick else "full")
    lora_dir, sharpen_dir = work / "trained-lora-merged-bf16", work / "sharpen-adapter"
    if not (lora_dir / "config.json").is_file():
        _log(f"[2/4] training a LoRA (r={LORA_RANK}, alpha={LORA_ALPHA}, {'+'.join(LORA_TARGETS)}) for "
             f"{settings.steps} steps on text:stdlib", quiet)
        train_lora(base, lora_dir, settings, quiet=quiet)
    else:
        _log(f"[2/4] trained LoRA already built: {lora_dir}", quiet)
    if not (sharpen_dir / "adapter_config.json").is_file():
        sharpening_adapter(base, sharpen_dir)
    _log(f"[3/4] synthetic sharpening adapter: {sharpen_dir}", quiet)
    options = run.ProfileOptions(length=settings.length, num=settings.num, seed=0, quiet=quiet)
    verdicts = {}
    base_profile = None
    for label, merged in (("demo-trained-lora", lora_dir), ("demo-sharpening-adapter", sharpen_dir)):
        _log(f"[4/4] attnprof profile smollm2-135m vs {merged}  (T={settings.length}, N={settings.num})", quiet)
        import tempfile
        with tempfile.TemporaryDirectory(prefix="attnprof-demo-") as tmp:
            lora = merged == lora_dir
            result = run.compare(str(base), str(merged), options, GateThresholds(), workdir=tmp,
                                 base_profile=base_profile,
                                 target_modules=list(LORA_TARGETS) if lora else None,
                                 adapter_rank=LORA_RANK if lora else None)
            base_profile = result.base
            command = (f"attnprof profile {base} vs {merged} --length {settings.length} "
                       f"--num {settings.num}" + (f" --targets {','.join(LORA_TARGETS)} --adapter-rank "
                                                  f"{LORA_RANK}" if lora else ""))
            run.write_run(out / label, command=command, comparison=result, seed=0)
        verdicts[label] = result.diff.verdict + (" (borderline)" if result.diff.borderline else "")
        _log(diff_summary(result.diff), quiet)
        _log(f"  report: {out / label / 'index.html'}", quiet)
    _log(f"demo finished in {time.time() - t0:.0f} s: trained LoRA {verdicts['demo-trained-lora']}, "
         f"sharpening adapter {verdicts['demo-sharpening-adapter']}; the reports show which heads moved "
         "and why", quiet)
    _log(f"open {out / 'demo-trained-lora' / 'index.html'} and {out / 'demo-sharpening-adapter' / 'index.html'}",
         quiet)
    return 0
