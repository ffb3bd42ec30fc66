"""Micro-benchmark of the attention kernels at SmolLM2-135M's attention shape (H=9, KV=3, D=64).

On CPU it times the chunked torch reference. On a CUDA machine with triton it also times, in bf16:
  dense 2-pass   both dense Triton passes (row statistics, then distance bins)
  dense+tail     the dense sums and the tail statistics (W = 256) in one launch, given the
                 layer's logsumexp: what a dense capture runs per layer where a fused attention
                 applies (the layer's attention is computed anyway)
  tail           the tail statistics alone given the logsumexp (a tail capture, one launch);
                 tail 2-pass without it (pass 1 on the tail rows); tail torch, the torch path
  sdpa           the layer's own attention forward, as transformers calls it (GQA unexpanded)
  <backend>+lse  the same attention through PyTorch's cuDNN (GQA in the kernel, or expanded)
                 or flash kernel, which also return the logsumexp (what a capture runs instead)
  batched/layer  the launches a capture makes for a batch of L layers (capture.LayerBatch: as
                 many as BATCH_BYTES of copies allow, at most 30, SmolLM2-135M's count),
                 divided by L: tail (the last W queries; pass 1 on them, then pass 2) and
                 dense+tail (all queries, given the layers' logsumexp: one launch)
and checks the kernel paths against the references (max |a − b| / (1 + |b|)). Then, at T = 256,
where a GPU is idle between launches, the host time per call of each (wall clock over 200 calls):
what a capture adds per layer to a forward pass that is bound by kernel launches, for 30 layers
captured in batches (the default on CUDA) and one by one.
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
from profiler.capture import (BATCH_BYTES, LSE_BACKENDS, Recorder, attention_with_logsumexp,  # noqa: E402
                              recording, tail_stats_torch)
from profiler.dense import (dense_profile_reference, dense_profile_triton, profile_triton,  # noqa: E402
                            tail_profile_triton, triton_available)


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


def lse_attention(backend: str) -> Callable:
    """attention_with_logsumexp through one backend, for timing."""
    layer = SimpleNamespace(is_causal=True)
    return lambda q, k, v, scale: attention_with_logsumexp(layer, q, k, v, None, 0.0, scale, {}, backends=(backend,))


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The layer's attention as transformers' sdpa path runs it without a mask (GQA in SDPA)."""
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)


def host_microseconds(fn: Callable[[], object], calls: int = 200) -> float:
    """Wall-clock microseconds per call, calls queued back to back, one synchronise at the end."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main(lengths: list[int]) -> None:
    heads, kv_heads, dim, window = 9, 3, 64, 256
    cuda = torch.cuda.is_available() and triton_available()
    header = f"{'T':>6} {'device':>6} {'reference ms':>13}"
    if cuda:
        header += (f" {'dense 2-pass':>12} {'dense+tail':>10} {'tail':>8} {'tail 2-pass':>11} {'tail torch':>10}"
                   f" {'sdpa':>8}" + "".join(f" {name + '+lse':>14}" for name in LSE_BACKENDS) +
                   f" {'tail L':>6} {'tail batched/layer':>18} {'dense L':>7} {'dense batched/layer':>19}" +
                   f" {'(dense+tail)/sdpa':>17} {'err dense':>9} {'err lse':>8} {'err tail':>8}")
        warm = torch.randn(4096, 4096, device="cuda")
        for _ in range(200):              # a second of work: clocks up before the first timing
            warm @ warm
        del warm
    print(header)
    scale = dim ** -0.5
    for length in lengths:
        device = "cuda" if cuda else "cpu"
        dtype = torch.bfloat16 if cuda else torch.float32
        query = torch.randn(1, heads, length, dim, device=device, dtype=dtype)
        key = torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype)
        ref = milliseconds(lambda: dense_profile_reference(query, key, scale))
        row = f"{length:>6} {device:>6} {ref:>13.1f}"
        if cuda:
            value = torch.randn_like(key)
            fused = {name: lse_attention(name) for name in LSE_BACKENDS}
            lse = next((out[1] for out in (f(query, key, value, scale) for f in fused.values()) if out), None)
            if lse is None:
                sys.exit("no fused attention with a logsumexp runs here (they need sm_80 or newer)")
            fused_ms = {name: (milliseconds(lambda: f(query, key, value, scale))
                               if f(query, key, value, scale) else float("nan")) for name, f in fused.items()}
            both = milliseconds(lambda: dense_profile_triton(query, key, scale))
            one_launch = milliseconds(lambda: profile_triton(query, key, scale, tail_window=window, logsumexp=lse))
            tail = milliseconds(lambda: tail_profile_triton(query, key, scale, window, logsumexp=lse))
            tail_two = milliseconds(lambda: tail_profile_triton(query, key, scale, window))
            tail_torch = milliseconds(lambda: tail_stats_torch(query, key, scale, None, window))
            plain = milliseconds(lambda: sdpa(query, key, value))
            # L layers as a LayerBatch holds them: their heads stacked (the same q, k repeated); a
            # tail batch keeps the last W queries, a dense one all of them and their logsumexp
            tail_layers = max(1, min(30, BATCH_BYTES // (2 * dim * (heads * window + kv_heads * length))))
            layers = max(1, min(30, BATCH_BYTES // (2 * dim * (heads + kv_heads) * length + 4 * heads * length)))
            many_q = query[:, :, length - window:].repeat(1, tail_layers, 1, 1)
            many_k = key.repeat(1, tail_layers, 1, 1)
            tail_batched = milliseconds(lambda: tail_profile_triton(many_q, many_k, scale, window)) / tail_layers
            many_q, many_k = query.repeat(1, layers, 1, 1), key.repeat(1, layers, 1, 1)
            many_lse = lse.repeat(1, layers, 1)
            dense_batched = milliseconds(
                lambda: profile_triton(many_q, many_k, scale, tail_window=window, logsumexp=many_lse)) / layers
            del many_q, many_k, many_lse
            want = dense_profile_reference(query, key, scale)
            torch_tail = tail_stats_torch(query, key, scale, None, window)
            dense, got_tail = profile_triton(query, key, scale, tail_window=window, logsumexp=lse)
            tail_err = max(error(got, getattr(torch_tail, f)) for got, f in zip(got_tail, ("A", "sink", "entropy")))
            row += (f" {both:>12.3f} {one_launch:>10.3f} {tail:>8.3f} {tail_two:>11.3f} {tail_torch:>10.3f}"
                    f" {plain:>8.3f}" + "".join(f" {fused_ms[name]:>14.3f}" for name in LSE_BACKENDS) +
                    f" {tail_layers:>6} {tail_batched:>18.3f} {layers:>7} {dense_batched:>19.3f}" +
                    f" {one_launch / plain:>17.2f} {error(dense_profile_triton(query, key, scale), want):>9.1e}"
                    f" {error(dense, want):>8.1e} {tail_err:>8.1e}")
        print(row, flush=True)
    if cuda:
        length = 256
        query = torch.randn(1, heads, length, dim, device="cuda", dtype=torch.bfloat16)
        key, value = (torch.randn(1, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16) for _ in "kv")
        lse = next(out[1] for out in (lse_attention(n)(query, key, value, scale) for n in LSE_BACKENDS) if out)
        print(f"\nhost time per call at T = {length}, W = 32 (us): the GPU waits for the host here")
        for name, fn, per in [("sdpa (the plain layer's attention)", lambda: sdpa(query, key, value), 1),
                              *[(f"{n}+lse", lambda f=lse_attention(n): f(query, key, value, scale), 1)
                                for n in LSE_BACKENDS],
                              ("tail given lse (1 launch)",
                               lambda: tail_profile_triton(query, key, scale, 32, logsumexp=lse), 1),
                              ("tail, 2 launches", lambda: tail_profile_triton(query, key, scale, 32), 1),
                              ("tail, torch", lambda: tail_stats_torch(query, key, scale, None, 32), 1),
                              ("dense+tail given lse (1 launch)",
                               lambda: profile_triton(query, key, scale, tail_window=32, logsumexp=lse), 1),
                              ("dense+tail, 2 launches", lambda: profile_triton(query, key, scale, tail_window=32), 1),
                              *[(f"capture, {estimator}, {how} (per layer)",
                                 lambda e=estimator, b=how == "batched": capture_layers(query, key, value, scale, e, b),
                                 30)
                                for estimator in ("tail", "dense") for how in ("batched", "one by one")]]:
            print(f"  {name:36s} {host_microseconds(fn, 200 // per) / per:8.1f}", flush=True)


def capture_layers(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                   estimator: str, batched: bool, layers: int = 30) -> None:
    """What a capture costs for `layers` layers' attention: the registered attention function for
    each, then `finish` (the statistics on the host)."""
    from profiler.capture import _attnprof_attention
    recorder = Recorder(estimator, 32, batch_layers=batched)
    with recording(recorder):
        for idx in range(layers):
            layer = SimpleNamespace(is_causal=True, layer_idx=idx,       # as transformers' attention modules
                                    num_key_value_groups=query.shape[1] // key.shape[1])
            _attnprof_attention(layer, query, key, value, None, scaling=scale)
    recorder.finish()


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [512, 2048, 8192])
