"""Micro-benchmark of the dense estimator at SmolLM2-135M's attention shape (H=9, KV=3, D=64).

On CPU it times the chunked torch reference. On a CUDA machine with triton it also times the
Triton kernels and, for scale, the layer's own sdpa attention, and checks the kernels against
the reference. Usage: python benchmarks/bench_dense.py [T ...]
"""
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profiler.dense import dense_profile_reference, dense_profile_triton, triton_available  # noqa: E402


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time in seconds of `repeat` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main(lengths: list[int]) -> None:
    heads, kv_heads, dim = 9, 3, 64
    cuda = torch.cuda.is_available() and triton_available()
    print(f"{'T':>6} {'device':>6} {'reference ms':>13} {'triton ms':>10} {'sdpa ms':>8} {'max err':>8}")
    for length in lengths:
        device = "cuda" if cuda else "cpu"
        dtype = torch.bfloat16 if cuda else torch.float32
        query = torch.randn(1, heads, length, dim, device=device, dtype=dtype)
        key = torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype)
        scale = dim ** -0.5
        ref = best_of(lambda: dense_profile_reference(query, key, scale))
        row = f"{length:>6} {device:>6} {ref * 1e3:>13.1f}"
        if cuda:
            tri = best_of(lambda: dense_profile_triton(query, key, scale))
            value = key.repeat_interleave(heads // kv_heads, 1)
            sdpa = best_of(lambda: F.scaled_dot_product_attention(query, value, value, is_causal=True))
            want = dense_profile_reference(query, key, scale)
            err = ((dense_profile_triton(query, key, scale) - want).abs()
                   / (1 + want.abs())).nan_to_num().max().item()
            row += f" {tri * 1e3:>10.2f} {sdpa * 1e3:>8.2f} {err:>8.1e}"
        print(row)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [512, 2048, 8192])
