"""Choose the dense kernels' tiles by timing them on this GPU; --save makes them the defaults.

For each head-dim class it times, at every length and with bf16 inputs,
  pass 1 (row softmax statistics) for each candidate stats tile, and
  pass 2 (distance bins) for each candidate bins tile,
beside the SDPA forward (flash attention) on the same query and key, so that the kernels'
throughput reads as a ratio. Every candidate is first checked against the torch reference at
T = 2048 (CHECK_LENGTH); the fastest correct one (sum of its times over the lengths) wins. --save writes the
winners to profiler/data/triton_blocks.json, the file `TritonBlocks.for_dtype` reads.

Shapes: d64 = SmolLM2-135M (9 heads, 3 kv heads, head dim 64); d128 = an 8B-class model
(32 heads, 8 kv heads, head dim 128).

    python benchmarks/tune_dense.py --lengths 8192 32768 --save
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profiler import dense  # noqa: E402
from profiler.dense import TritonBlocks  # noqa: E402
from bench_dense import error, milliseconds  # noqa: E402  (this script's folder is on sys.path)

DEVICE = "cuda"
CHECK_LENGTH = 2048
SHAPES = {"d64": (9, 3, 64), "d128": (32, 8, 128)}
# (stats_m, stats_n, stats_warps)
STATS = [(64, 64, 8), (64, 64, 4), (128, 64, 8), (128, 64, 4), (128, 128, 8), (64, 128, 4), (128, 32, 4)]
# (rows, dists, rows_per_program, bins_warps)
BINS = [(16, 64, 256, 8), (16, 64, 1024, 4), (16, 128, 1024, 4), (32, 64, 1024, 4), (32, 128, 1024, 8),
        (64, 64, 1024, 4), (64, 64, 1024, 8), (64, 128, 1024, 8), (64, 128, 2048, 8), (32, 64, 4096, 4),
        (64, 64, 4096, 8), (16, 64, 4096, 4)]


def timed_ms(fn) -> float:
    """Median milliseconds of fn on the GPU."""
    return milliseconds(fn, rep=60)


def qk(heads: int, kv_heads: int, length: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(length)
    query = torch.randn(1, heads, length, dim, device=DEVICE, generator=gen).to(torch.bfloat16)
    key = torch.randn(1, kv_heads, length, dim, device=DEVICE, generator=gen).to(torch.bfloat16)
    return query, key


def tune_shape(name: str, lengths: list[int], base: TritonBlocks) -> TritonBlocks:
    heads, kv_heads, dim = SHAPES[name]
    scale = dim ** -0.5
    stats_blocks = [dataclasses.replace(base, stats_m=m, stats_n=n, stats_warps=w) for m, n, w in STATS]
    bins_blocks = [dataclasses.replace(base, rows=r, dists=d, rows_per_program=p, bins_warps=w)
                   for r, d, p, w in BINS]
    query, key = qk(heads, kv_heads, CHECK_LENGTH, dim)
    want = dense.dense_profile_reference(query, key, scale)
    ok_stats, ok_bins = [], []
    for group, keep in ((stats_blocks, ok_stats), (bins_blocks, ok_bins)):
        for blocks in group:
            try:
                mismatch = error(dense.dense_profile_triton(query, key, scale, blocks=blocks), want)
            except Exception as exc:                  # a tile that does not compile: not a candidate
                print(f"  {name} {blocks}: failed: {str(exc).splitlines()[0][:100]}", flush=True)
                continue
            if mismatch <= 1e-3:
                keep.append(blocks)
            else:
                print(f"  {name} {blocks}: WRONG (error {mismatch:.2e}), dropped", flush=True)
    stats_total = {b: 0.0 for b in ok_stats}
    bins_total = {b: 0.0 for b in ok_bins}
    for length in lengths:
        query, key = qk(heads, kv_heads, length, dim)
        value = key.repeat_interleave(heads // kv_heads, 1)
        sdpa = timed_ms(lambda: F.scaled_dot_product_attention(query, value, value, is_causal=True))
        print(f"\n{name}: H={heads} KV={kv_heads} D={dim} T={length} bf16; SDPA forward {sdpa:.3f} ms", flush=True)
        print(f"  {'pass 1: stats_m stats_n warps':44s} {'ms':>8s} {'/ SDPA':>7s}")
        for blocks in ok_stats:
            ms = timed_ms(lambda: dense._row_stats_triton(query, key, scale, length, blocks))
            stats_total[blocks] += ms
            print(f"  {blocks.stats_m:>14d} {blocks.stats_n:>7d} {blocks.stats_warps:>5d}"
                  f"{'':16s} {ms:8.3f} {ms / sdpa:7.2f}", flush=True)
        row_max, row_sum = dense._row_stats_triton(query, key, scale, length, base)
        print(f"  {'pass 2: rows dists rows/program warps':44s} {'ms':>8s} {'/ SDPA':>7s}")
        for blocks in ok_bins:
            ms = timed_ms(lambda: dense._distance_bins_triton(query, key, scale, length, blocks, row_max, row_sum))
            bins_total[blocks] += ms
            print(f"  {blocks.rows:>11d} {blocks.dists:>5d} {blocks.rows_per_program:>12d} {blocks.bins_warps:>5d}"
                  f"{'':9s} {ms:8.3f} {ms / sdpa:7.2f}", flush=True)
        del query, key, value, row_max, row_sum
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    best_stats = min(stats_total, key=stats_total.get)
    best_bins = min(bins_total, key=bins_total.get)
    best = dataclasses.replace(best_bins, stats_m=best_stats.stats_m, stats_n=best_stats.stats_n,
                               stats_warps=best_stats.stats_warps)
    for length in lengths:
        query, key = qk(heads, kv_heads, length, dim)
        value = key.repeat_interleave(heads // kv_heads, 1)
        sdpa = timed_ms(lambda: F.scaled_dot_product_attention(query, value, value, is_causal=True))
        before = timed_ms(lambda: dense.dense_profile_triton(query, key, scale, blocks=base))
        after = timed_ms(lambda: dense.dense_profile_triton(query, key, scale, blocks=best))
        print(f"  {name} T={length}: both passes {before:.3f} ms with the tiles the file held before this run, "
              f"{after:.3f} ms tuned ({before / after:.2f}× faster); SDPA {sdpa:.3f} ms; "
              f"tuned / SDPA = {after / sdpa:.2f}", flush=True)
        del query, key, value
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(f"  {name} best: {best}", flush=True)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--save", action="store_true", help=f"write the winners to {dense.TUNED_BLOCKS_FILE}")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not dense.triton_available():
        sys.exit("tune_dense needs a CUDA device and triton")
    import triton
    table = json.loads(dense.TUNED_BLOCKS_FILE.read_text())
    for name in args.shapes:
        base = TritonBlocks(**table["half"][name])
        table["half"][name] = dataclasses.asdict(tune_shape(name, args.lengths, base))
    table["source"] = (f"timed on {torch.cuda.get_device_name()} (torch {torch.__version__}, triton "
                       f"{triton.__version__}) by benchmarks/tune_dense.py at T = "
                       f"{', '.join(map(str, args.lengths))}, bf16; fp32 not timed")
    print(json.dumps(table, indent=2))
    if args.save:
        tmp = dense.TUNED_BLOCKS_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=2) + "\n")
        os.replace(tmp, dense.TUNED_BLOCKS_FILE)
        print(f"saved to {dense.TUNED_BLOCKS_FILE}")


if __name__ == "__main__":
    main()
