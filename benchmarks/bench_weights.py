"""Weight-diff cost on two synthetic multi-GB sharded checkpoints.

Writes a Llama-shaped base (random weights, ~3 GB in bf16 by default) and a merged copy whose
q_proj/v_proj carry a rank-8 LoRA delta (merged in float32, saved in bf16, as peft users do),
both as ~1 GB shards with a model.safetensors.index.json, into a temporary folder that is
removed afterwards. The diff then runs in a fresh child process so that its peak memory is its
own: peak RSS is the process's high-water mark (/proc VmHWM, reset after imports), reported
absolute, as growth above the resident size before the diff, and relative to the largest
tensor pair and to the checkpoint size.

    python benchmarks/bench_weights.py                 # 2 × ~3 GB
    python benchmarks/bench_weights.py --size-gb 0.3   # quick check
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE, VOCAB, RANK = 2048, 5632, 32000, 8

CHILD = """
import json, sys, time
import torch
from profiler.weights import diff_weights

def kib(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))

base, merged, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = kib("VmRSS")
start = time.perf_counter()
wd = diff_weights(base, merged, target_modules=["q_proj", "v_proj"], adapter_rank=8)
wall = time.perf_counter() - start
targeted = [t for t in wd.tensors if t.in_targets]
print(json.dumps({
    "wall_s": wall, "tensors": wd.num_tensors, "rss_before": before * 1024, "peak_rss": kib("VmHWM") * 1024,
    "targeted": len(targeted), "targeted_rank8": sum(t.signal_rank == 8 for t in targeted),
    "others_unchanged": all(t.status == "unchanged" for t in wd.tensors if not t.in_targets),
    "flags": wd.flag_codes, "threads": torch.get_num_threads(),
}))
"""


def layer_count(size_gb: float, bytes_per: int) -> int:
    per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN) * bytes_per
    embeddings = 2 * VOCAB * HIDDEN * bytes_per
    return max(1, round((size_gb * 1e9 - embeddings) / per_layer))


def tensor_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Llama names and shapes, in checkpoint order."""
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
        out += [(p + f"self_attn.{m}.weight", (HIDDEN, HIDDEN)) for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [(p + f"mlp.{m}.weight", (INTERMEDIATE, HIDDEN)) for m in ("gate_proj", "up_proj")]
        out += [(p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE))]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def write_checkpoints(root: Path, layers: int, dtype: torch.dtype, shard_bytes: float) -> tuple[int, int]:
    """Write base and merged shard by shard; returns (checkpoint bytes, largest tensor pair bytes)."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(0)
    shapes = tensor_shapes(layers)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shards, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = itemsize * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    maps = {"base": {}, "merged": {}}
    for side in maps:
        (root / side).mkdir()
    total = 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        base, merged = {}, {}
        for name, shape in shard:
            w = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen).mul_(0.02)
            base[name] = w.to(dtype)
            merged[name] = base[name]
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                b = torch.randn(shape[0], RANK, generator=gen) * 0.01
                a = torch.randn(RANK, shape[1], generator=gen) / shape[1] ** 0.5
                merged[name] = (base[name].float() + 2.0 * (b @ a)).to(dtype)   # alpha/r = 16/8
            total += base[name].nbytes
        save_file(base, str(root / "base" / file), metadata={"format": "pt"})
        save_file(merged, str(root / "merged" / file), metadata={"format": "pt"})
        for side, tensors in (("base", base), ("merged", merged)):
            maps[side].update({n: file for n in tensors})
    for side, weight_map in maps.items():
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / side / "model.safetensors.index.json").write_text(json.dumps(index))
    largest = max(int(torch.Size(s).numel()) for _, s in shapes) * itemsize
    return total, 2 * largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=3.0, help="size of each checkpoint (default 3)")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: system temp)")
    parser.add_argument("--threads", type=int, nargs="+", default=[0],
                        help="torch threads for the diff, one run each (0: torch's default)")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    layers = layer_count(args.size_gb, torch.empty(0, dtype=dtype).element_size())
    root = Path(tempfile.mkdtemp(prefix="attnprof-bench-weights-", dir=args.dir))
    try:
        start = time.perf_counter()
        total, pair = write_checkpoints(root, layers, dtype, args.shard_gb * 1e9)
        written = time.perf_counter() - start
        print(f"wrote 2 × {total / 1e9:.2f} GB ({layers} layers, {args.dtype}, "
              f"{len(list((root / 'base').glob('*.safetensors')))} shards each) in {written:.0f} s")
        runs = []
        for threads in args.threads:
            out = subprocess.run([sys.executable, "-c", CHILD, str(root / "base"), str(root / "merged"),
                                  str(threads)], capture_output=True, text=True, cwd=ROOT, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for r in runs:
        report(r, total, pair)


def report(r: dict, total: int, pair: int) -> None:
    growth = r["peak_rss"] - r["rss_before"]
    mib = 2 ** 20
    print(f"diff wall time        {r['wall_s']:.1f} s  ({r['threads']} torch threads)")
    print(f"tensors/s             {r['tensors'] / r['wall_s']:.1f}  ({r['tensors']} tensors, "
          f"{2 * total / 1e9 / r['wall_s']:.2f} GB/s read)")
    print(f"peak RSS              {r['peak_rss'] / mib:.0f} MiB  (growth during the diff {growth / mib:.0f} MiB)")
    print(f"growth / largest pair {growth / pair:.2f}  (pair {pair / mib:.0f} MiB)")
    print(f"growth / checkpoint   {growth / total:.3f}  (checkpoint {total / mib:.0f} MiB)")
    print(f"check                 {r['targeted_rank8']}/{r['targeted']} q/v matrices at signal rank 8, "
          f"others unchanged: {r['others_unchanged']}, flags: {r['flags'] or 'none'}")


if __name__ == "__main__":
    main()
