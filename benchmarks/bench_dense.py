"""Micro-benchmark of the dense estimator at SmolLM2-135M's attention shape (H=9, KV=3, D=64).

On CPU it times the chunked torch reference. On a CUDA machine with triton it also times, in bf16:
  triton     both Triton passes (row statistics, then distance bins)
  pass 2     the distance-bins pass alone, given flash attention's logsumexp (what a dense
             capture runs where flash applies: the layer's attention is computed anyway)
  sdpa       the layer's own attention forward (F.scaled_dot_product_attention, causal)
  flash+lse  the same attention through the flash kernel that also returns the logsumexp
and checks both kernel paths against the reference (max |a − b| / (1 + |b|)).
Usage: python benchmarks/bench_dense.py [T ...]
"""
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profiler.capture import flash_with_logsumexp  # noqa: E402
from profiler.dense import dense_profile_reference, dense_profile_triton, triton_available  # noqa: E402


def milliseconds(fn: Callable[[], object], rep: int = 100) -> float:
    """Median GPU milliseconds (triton's do_bench, repeating for `rep` ms) on CUDA; best of 3
    wall-clock runs on CPU."""
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |a − b| / (1 + |b|) where both are defined; inf when their NaNs differ."""
    if not torch.equal(got.isnan(), want.isnan()):
        return float("inf")
    seen = ~want.isnan()
    return ((got - want).abs() / (1 + want.abs()))[seen].max().item()


def main(lengths: list[int]) -> None:
    heads, kv_heads, dim = 9, 3, 64
    cuda = torch.cuda.is_available() and triton_available()
    header = f"{'T':>6} {'device':>6} {'reference ms':>13}"
    if cuda:
        header += (f" {'triton ms':>10} {'pass 2 ms':>10} {'sdpa ms':>8} {'flash+lse':>10}"
                   f" {'triton/sdpa':>12} {'pass2/sdpa':>11} {'max err':>8} {'err lse':>8}")
    print(header)
    for length in lengths:
        device = "cuda" if cuda else "cpu"
        dtype = torch.bfloat16 if cuda else torch.float32
        query = torch.randn(1, heads, length, dim, device=device, dtype=dtype)
        key = torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype)
        scale = dim ** -0.5
        ref = milliseconds(lambda: dense_profile_reference(query, key, scale))
        row = f"{length:>6} {device:>6} {ref:>13.1f}"
        if cuda:
            value = torch.randn_like(key)
            layer = SimpleNamespace(is_causal=True)
            flash = flash_with_logsumexp(layer, query, key, value, None, 0.0, scale, {})
            if flash is None:
                sys.exit("PyTorch's flash attention does not run here (it needs sm_80 or newer)")
            lse = flash[1]
            both = milliseconds(lambda: dense_profile_triton(query, key, scale))
            second = milliseconds(lambda: dense_profile_triton(query, key, scale, logsumexp=lse))
            values = value.repeat_interleave(heads // kv_heads, 1)
            keys = key.repeat_interleave(heads // kv_heads, 1)
            sdpa = milliseconds(lambda: F.scaled_dot_product_attention(query, keys, values, is_causal=True))
            flash = milliseconds(lambda: flash_with_logsumexp(layer, query, key, value, None, 0.0, scale, {}))
            want = dense_profile_reference(query, key, scale)
            row += (f" {both:>10.3f} {second:>10.3f} {sdpa:>8.3f} {flash:>10.3f} {both / sdpa:>12.2f}"
                    f" {second / sdpa:>11.2f}"
                    f" {error(dense_profile_triton(query, key, scale), want):>8.1e}"
                    f" {error(dense_profile_triton(query, key, scale, logsumexp=lse), want):>8.1e}")
        print(row, flush=True)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [512, 2048, 8192])
