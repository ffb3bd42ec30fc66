"""Dense estimator: the chunked reference against a naive T × T computation, uniform attention
giving exactly 1, the Triton kernels against the reference in Triton's CPU interpreter, an
ahead-of-time compile of the kernels for sm_90, and the reference's peak memory.

Triton runs happen in subprocesses (this file run as a script) because TRITON_INTERPRET must
be set before triton is imported and must not leak into the rest of the suite.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from conftest import causal_logsumexp, random_qk

from profiler.dense import (
    TritonBlocks,
    dense_counts,
    dense_profile,
    dense_profile_reference,
    dense_profile_triton,
)

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def triton_version() -> tuple[int, ...]:
    from importlib.metadata import version
    return tuple(int(part) for part in version("triton").split(".")[:2])


# Triton 3.6's interpreter cannot loop over bounds derived from tl.program_id ("only
# 0-dimensional arrays can be converted to Python scalars"; seen on the GPU machine's 3.6.0);
# 3.9 can. The compiled kernels are unaffected (test_gpu.py runs them on hardware).
NEEDS_INTERPRETER = pytest.mark.skipif(not HAS_TRITON or triton_version() < (3, 9),
                                       reason="needs triton >= 3.9 for its CPU interpreter")
SMALL_BLOCKS = TritonBlocks(stats_m=16, stats_n=16, rows=16, dists=16, rows_per_program=32)


def naive_profile(query: torch.Tensor, key: torch.Tensor, scaling: float,
                  window: int | None = None) -> torch.Tensor:
    """The definition, literally, in float64: full T × T softmax, then diagonal means."""
    batch, heads, length, _ = query.shape
    keys = key.double().repeat_interleave(heads // key.shape[1], dim=1)
    scores = query.double() @ keys.transpose(-1, -2) * scaling
    i = torch.arange(length).unsqueeze(1)
    j = torch.arange(length).unsqueeze(0)
    visible = (j <= i) & (j > i - (length if window is None else window))
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1) * visible.sum(-1, keepdim=True)
    out = torch.full((batch, heads, length), float("nan"), dtype=torch.float64)
    for d in range(length):
        diagonal = torch.diagonal(weights, offset=-d, dim1=-2, dim2=-1)
        seen = torch.diagonal(visible, offset=-d)
        if seen.any():
            out[..., d] = diagonal[..., seen].mean(-1)
    return out


@pytest.mark.parametrize("heads,kv_heads,length,window,chunk", [
    (4, 4, 37, None, 8),      # MHA, T not a multiple of the chunk
    (4, 2, 37, None, 16),     # GQA
    (4, 2, 37, 5, 8),         # GQA + window smaller than the chunk
    (6, 2, 50, 13, 7),        # window larger than the chunk, odd chunk
    (4, 1, 20, 100, 256),     # window ≥ T behaves as causal; single chunk
    (2, 2, 9, 3, 1),          # one query per chunk
])
def test_reference_matches_naive(heads: int, kv_heads: int, length: int,
                                 window: int | None, chunk: int) -> None:
    dim = 16
    query, key = random_qk(2, heads, kv_heads, length, dim)
    got = dense_profile_reference(query, key, dim ** -0.5, window, chunk=chunk)
    want = naive_profile(query, key, dim ** -0.5, window)
    assert got.dtype == torch.float32 and got.shape == (2, heads, length)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("zero", ["query", "key"])
@pytest.mark.parametrize("kv_heads,window", [(4, None), (2, None), (2, 7), (1, 1)])
def test_uniform_attention_is_exactly_one(zero: str, kv_heads: int, window: int | None) -> None:
    length = 70
    query, key = random_qk(2, 4, kv_heads, length, 16)
    if zero == "query":
        query.zero_()
    else:
        key.zero_()
    profile = dense_profile_reference(query, key, 0.3, window, chunk=32)
    visible = dense_counts(length, window) > 0
    assert torch.equal(profile[..., visible], torch.ones_like(profile[..., visible]))
    assert profile[..., ~visible].isnan().all()


def test_counts_and_masked_distances() -> None:
    assert dense_counts(5).tolist() == [5, 4, 3, 2, 1]
    assert dense_counts(5, 2).tolist() == [5, 4, 0, 0, 0]
    assert dense_counts(3, 10).tolist() == [3, 2, 1]
    query, key = random_qk(1, 2, 2, 12, 16)
    profile = dense_profile_reference(query, key, 0.25, sliding_window=4)
    assert profile[..., :4].isfinite().all() and profile[..., 4:].isnan().all()
    # window 1: each query sees only itself, so D(0) = 1 and every other distance is empty
    profile = dense_profile_reference(query, key, 0.25, sliding_window=1)
    assert torch.equal(profile[..., 0], torch.ones(1, 2)) and profile[..., 1:].isnan().all()


@pytest.mark.parametrize("window", [None, 5])
def test_self_attention_known_answer(window: int | None) -> None:
    """One-hot queries and keys with logit 100 on the diagonal: P[i, i] = 1 to fp32 precision,
    so D(0) = mean_i n_i (= (T + 1) / 2 when causal) and D(d > 0) = 0."""
    length = 24
    basis = torch.eye(length).expand(1, 2, length, length) * 10.0
    profile = dense_profile_reference(basis, basis, 1.0, window, chunk=10)
    visible_keys = torch.clamp(torch.arange(1, length + 1), max=window or length).double()
    assert profile[..., 0].double().sub(visible_keys.mean()).abs().max() < 1e-5
    assert profile[..., 1:window].abs().max() < 1e-30


def test_half_inputs_are_upcast() -> None:
    query, key = random_qk(1, 4, 2, 40, 16)
    for dtype in (torch.float16, torch.bfloat16):
        q, k = query.to(dtype), key.to(dtype)
        got = dense_profile_reference(q, k, 0.25, 9, chunk=16)
        assert got.dtype == torch.float32
        want = dense_profile_reference(q.float(), k.float(), 0.25, 9)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_dispatch_and_validation() -> None:
    query, key = random_qk(1, 4, 2, 30, 16)
    want = dense_profile_reference(query, key, 0.25)
    torch.testing.assert_close(dense_profile(query, key, 0.25), want, equal_nan=True)
    torch.testing.assert_close(dense_profile(query, key, 0.25, backend="torch"), want, equal_nan=True)
    with pytest.raises(ValueError, match="backend"):
        dense_profile(query, key, 0.25, backend="cuda")
    with pytest.raises(ValueError, match="share"):
        dense_profile_reference(query, key[:, :1].expand(1, 3, 30, 16), 0.25)
    with pytest.raises(ValueError, match="does not match"):
        dense_profile_reference(query, key[:, :, :20], 0.25)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="sliding_window"):
            dense_profile_reference(query, key, 0.25, sliding_window=bad)
    with pytest.raises(ValueError, match="power of two"):
        TritonBlocks(rows=24)
    if HAS_TRITON and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="CUDA"):
            dense_profile(query, key, 0.25, backend="triton")


# ---- Triton: subprocess workers -------------------------------------------------------------

def interpreter_cases() -> list[dict[str, Any]]:
    """Kernel-vs-reference cases, small enough for the interpreter (0.1 to 1 s each).

    `small` tiles of 16 make T = 72 or 100 span several blocks in every grid dimension.
    """
    cases = []
    for length in (33, 64, 100):
        for dim in (16, 32):
            cases.append(dict(dtype="float32", length=length, dim=dim))
    cases += [
        dict(dtype="float32", length=100, dim=32, window=24),
        dict(dtype="float32", length=100, dim=16, window=24, small=True),
        dict(dtype="float32", length=72, dim=16, small=True),
        dict(dtype="float32", length=64, dim=32, kv_heads=4, window=5, small=True),
        dict(dtype="float32", length=40, dim=80, batch=2, transposed=True),
        dict(dtype="float32", length=20, dim=16, window=1, small=True),
        dict(dtype="float32", length=72, dim=16, small=True, uniform=True),
        dict(dtype="float32", length=64, dim=32, uniform=True),
        dict(dtype="float32", length=32, dim=32, window=9, small=True, onehot=True),
        dict(dtype="float32", length=100, dim=32, kv_heads=1, small=True, lse=True),
    ]
    # the tail-window statistics through the same kernels, against capture's torch path: alone
    # (pass 1 on the tail rows, or given their logsumexp), and beside the dense profile (both)
    cases += [
        dict(dtype="float32", length=100, dim=32, tail=12, small=True),
        dict(dtype="float32", length=72, dim=16, tail=1, small=True),
        dict(dtype="float32", length=64, dim=16, tail=64, small=True),
        dict(dtype="float32", length=100, dim=32, tail=37),
        dict(dtype="float32", length=80, dim=16, kv_heads=1, tail=16, small=True, uniform=True),
        dict(dtype="float32", length=100, dim=32, tail=20, small=True, lse=True),
        dict(dtype="float32", length=100, dim=32, tail=20, small=True, both=True),
        dict(dtype="float32", length=90, dim=16, tail=7, small=True, both=True, lse=True),
        dict(dtype="bfloat16", length=100, dim=32, kv_heads=1, tail=13, small=True),
        dict(dtype="bfloat16", length=72, dim=32, tail=9, both=True, lse=True),
        dict(dtype="float16", length=64, dim=32, batch=2, transposed=True, tail=8),
        dict(dtype="float16", length=64, dim=32, batch=2, transposed=True, tail=8, both=True, lse=True),
    ]
    # the tail from a query that holds only its last rows (as capture's layer batches keep it)
    cases += [
        dict(dtype="float32", length=100, dim=32, tail=12, small=True, rows=12),
        dict(dtype="float32", length=100, dim=16, kv_heads=1, tail=9, small=True, rows=40),
        dict(dtype="float32", length=100, dim=16, kv_heads=1, tail=9, small=True, rows=40, lse=True),
        dict(dtype="bfloat16", length=72, dim=32, tail=9, small=True, rows=9, lse=True),
        dict(dtype="float16", length=64, dim=32, batch=2, transposed=True, tail=8, rows=20),
    ]
    for dtype in ("float16", "bfloat16"):
        cases += [
            dict(dtype=dtype, length=33, dim=16),
            dict(dtype=dtype, length=100, dim=32, window=24, small=True),
            dict(dtype=dtype, length=72, dim=16, small=True),
            dict(dtype=dtype, length=64, dim=32, batch=2, transposed=True, uniform=True),
            dict(dtype=dtype, length=72, dim=16, small=True, lse=True),
        ]
    return cases


def case_id(case: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


def run_interpreter_case(case: dict[str, Any]) -> dict[str, Any]:
    """Kernel and reference on the same inputs; error = max |a − b| / (1 + |b|)."""
    batch, heads, kv_heads = case.get("batch", 1), 4, case.get("kv_heads", 2)
    length, dim, window = case["length"], case["dim"], case.get("window")
    dtype = getattr(torch, case["dtype"])
    query, key = random_qk(batch, heads, kv_heads, length, dim, seed=length + dim)
    if case.get("uniform"):
        query.zero_()
    if case.get("onehot"):       # hard self-attention (see test_self_attention_known_answer)
        key = torch.eye(length).expand(batch, kv_heads, length, dim) * 10.0
        query = torch.eye(length).expand(batch, heads, length, dim) * 10.0
    if case.get("transposed"):   # as transformers hands them over: views of (B, T, H, D)
        query = query.transpose(1, 2).contiguous().transpose(1, 2)
        key = key.transpose(1, 2).contiguous().transpose(1, 2)
    query, key = query.to(dtype), key.to(dtype)
    blocks = SMALL_BLOCKS if case.get("small") else None
    # lse: pass 1 skipped, its result given as the natural-log normaliser flash attention returns
    lse = causal_logsumexp(query, key, dim ** -0.5) if case.get("lse") else None
    if case.get("tail"):
        return run_tail_case(query, key, case["tail"], blocks, lse, case.get("both", False), case.get("rows"))
    got = dense_profile_triton(query, key, dim ** -0.5, window, blocks=blocks, logsumexp=lse)
    want = dense_profile_reference(query, key, dim ** -0.5, window)
    finite = want.isfinite()
    error = ((got - want).abs() / (1 + want.abs()))[finite].max().item()
    return dict(error=error, nan_match=bool(torch.equal(got.isnan(), want.isnan())),
                exact_one=bool(torch.equal(got[finite], torch.ones_like(got[finite]))))


def compile_for_sm90() -> dict[str, Any]:
    """Compile both kernels ahead of time for an H100 (sm_90): no GPU needed, catches what
    the interpreter tolerates but the compiler rejects."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from profiler.dense import _kernel_constants, _triton_kernels

    kernels = _triton_kernels()
    assert kernels is not None
    result = {}
    for dtype, dim in ((torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 64)):
        pointer = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
        blocks = TritonBlocks.for_dtype(dtype, dim)
        stats, bins, stats_options, bins_options = _kernel_constants(dtype, dim, blocks)
        variants = [("row_stats", stats, stats_options), ("distance_bins", bins, bins_options)]
        if dtype == torch.bfloat16:      # the tail window alone, beside the dense sums, given a logsumexp
            for variant, flags in (("tail", dict(dense=False, tail=True)), ("both", dict(tail=True)),
                                   ("both-lse", dict(tail=True, has_sum=False))):
                variants.append((f"distance_bins-{variant}", _kernel_constants(dtype, dim, blocks, **flags)[1],
                                 bins_options))
        for name, constants, options in variants:
            kernel = kernels[name.split("-")[0]]
            signature = {}
            for param in kernel.params:
                if param.is_constexpr:
                    signature[param.name] = "constexpr"
                elif param.name in ("q_ptr", "k_ptr"):
                    signature[param.name] = pointer
                elif param.name.endswith("_ptr"):
                    signature[param.name] = "*fp32"
                else:
                    signature[param.name] = "fp32" if param.name in ("qk_scale", "m_scale") else "i32"
            compiled = triton.compile(ASTSource(kernel, signature, constants),
                                      target=GPUTarget("cuda", 90, 32), options=options)
            result[f"{name}-{pointer[1:]}-d{dim}"] = len(compiled.asm["cubin"])
    return result


def peak_extra_bytes(control_only: bool = False) -> dict[str, Any]:
    """Peak resident memory added by the reference at T = 8192, and by a 512 MiB control.

    Linux lets a process reset its peak-RSS mark (write 5 to /proc/self/clear_refs), so
    peak − current before the call is exactly what the call added, and both measurements fit
    in one process. Without it, ru_maxrss after − before is a lower bound and only valid for
    the first measurement of a process: then the control is left to a second process.
    """
    import resource

    torch.set_num_threads(2)
    query, key = random_qk(1, 4, 4, 8192, 16)
    dense_profile_reference(query[..., :512, :], key[..., :512, :], 0.25)   # warm thread pools

    def status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def measure(task: Callable[[], object]) -> int:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            before = status_kib("VmRSS")
            task()
            return (status_kib("VmHWM") - before) * 1024
        except OSError:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            task()
            return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024

    def control() -> None:   # written, so its pages are resident
        torch.ones(128 * 2 ** 20)

    if control_only:
        return dict(control=measure(control))
    result = dict(reference=measure(lambda: dense_profile_reference(query, key, 0.25)))
    if os.access("/proc/self/clear_refs", os.W_OK):
        result["control"] = measure(control)
    return result


def run_tail_case(query: torch.Tensor, key: torch.Tensor, window: int, blocks: TritonBlocks | None,
                  lse: torch.Tensor | None, both: bool, rows: int | None = None) -> dict[str, Any]:
    """profile_triton's tail statistics against capture.tail_stats_torch (and, with `both`, its
    dense profile against the reference): the largest error over A, sink, entropy (and dense).
    `rows`: the kernels get only the last `rows` queries (and their logsumexp)."""
    from profiler.capture import tail_stats_torch
    from profiler.dense import profile_triton
    dim = query.shape[-1]
    last = slice(query.shape[2] - (rows or query.shape[2]), None)
    dense, tail = profile_triton(query[:, :, last], key, dim ** -0.5, dense=both, tail_window=window,
                                 logsumexp=None if lse is None else lse[..., last], blocks=blocks)
    want = tail_stats_torch(query, key, dim ** -0.5, None, window)
    pairs = list(zip(tail, (want.A, want.sink, want.entropy)))
    if both:
        pairs.append((dense, dense_profile_reference(query, key, dim ** -0.5)))
    else:
        assert dense is None
    return dict(error=max(((g - w).abs() / (1 + w.abs())).nan_to_num().max().item() for g, w in pairs),
                nan_match=all(g.shape == w.shape and torch.equal(g.isnan(), w.isnan()) for g, w in pairs),
                exact_one=None)


# capture.Recorder's layer batches: (case, estimator, layers per launch). A 5-layer GQA model
# (4 heads, 2 KV, head dim 16) at T = 90, W = 12, with the batch budget for all layers, for two
# (2 · one layer's copies: fp32 queries R × 4 heads + keys 90 × 2 heads, + the dense profile's
# fp32 logsumexp unused here), or for none (1 byte: every layer on its own, in torch); then
# layers recorded by hand whose scale (or logsumexp) changes, which must start a new batch, and
# the same when a batch cannot be allocated (out of memory: every layer on its own).
BATCHED_CASES = [("model-all", "tail", [5]), ("model-two", "tail", [2, 2, 1]), ("model-none", "tail", []),
                 ("model-all", "dense", [5]), ("model-two", "dense", [2, 2, 1]), ("model-none", "dense", []),
                 ("by-hand", "tail", [2, 1]), ("by-hand", "dense", [2, 1]), ("by-hand-oom", "dense", [])]


def run_batched_case(name: str, estimator: str) -> dict[str, Any]:
    """Layers reduced in batches (one launch for several layers, Triton) against the same layers
    reduced one by one (torch): the largest error over every statistic, NaNs, the batch sizes."""
    from profiler import capture as cap

    sizes: list[int] = []
    run, empty = cap.LayerBatch.run, cap.LayerBatch.__dict__["empty"]
    cap.LayerBatch.run = lambda self, *args: sizes.append(len(self.layers)) or run(self, *args)
    if name.endswith("oom"):
        def no_memory(cls, *args: Any) -> None:
            raise torch.OutOfMemoryError("no room for a batch")
        cap.LayerBatch.empty = classmethod(no_memory)
    try:
        return _batched_case(name, estimator, cap, sizes)
    finally:
        cap.LayerBatch.run, cap.LayerBatch.empty = run, empty


def _batched_case(name: str, estimator: str, cap: Any, sizes: list[int]) -> dict[str, Any]:
    from types import SimpleNamespace

    import numpy as np

    from conftest import tiny_model
    window, dense = 12, estimator == "dense"
    flushed = None
    if name.startswith("model"):
        cap.register()
        model = tiny_model("llama", num_hidden_layers=5, num_key_value_heads=2)
        model.set_attn_implementation(cap.ATTN_NAME)
        ids = torch.as_tensor(np.random.default_rng(1).integers(0, 300, size=(1, 90)))
        one_layer = 4 * 16 * (4 * (90 if dense else window) + 2 * 90) + (4 * 4 * 90 if dense else 0)
        budget = {"model-all": cap.BATCH_BYTES, "model-two": 2 * one_layer, "model-none": 1}[name]

        def record(**options: Any) -> dict[int, Any]:
            nonlocal flushed
            with cap.recording(cap.Recorder(estimator, window, **options)) as rec, torch.inference_mode():
                model(input_ids=ids, use_cache=False)
            flushed = sorted(rec.layers) == list(range(5))      # the end of recording() empties the batch
            return rec.finish().layers
        want = record(batch_layers=False)
        got = record(batch_layers=True, batch_bytes=budget)
    else:
        query, key = random_qk(1, 4, 2, 60, 16, seed=3)
        layers = [(query, 0.25), (query.flip(2), 0.25), (query, 0.5)]      # the third's scale differs
        rec = cap.Recorder(estimator, window, batch_layers=True)
        want = {}
        for idx, (q, scale) in enumerate(layers):
            lse = causal_logsumexp(q, key, scale) if dense and idx < 2 else None     # the third has none
            rec.record(SimpleNamespace(layer_idx=idx), q, key, None, scale, logsumexp=lse)
            want[idx] = cap.layer_stats(q, key, scale, None, window, dense)
        got = rec.finish().layers
    pairs = [(getattr(got[i], f), getattr(want[i], f).float()) for i in want for f in cap.STAT_FIELDS]
    return dict(sizes=sizes, layers=sorted(got) == sorted(want), flushed=flushed,
                error=max(((g - w).abs() / (1 + w.abs())).nan_to_num().max().item() for g, w in pairs),
                nan_match=all(g.shape == w.shape and torch.equal(g.isnan(), w.isnan()) for g, w in pairs))


def run_worker(*args: str, interpret: bool = False, timeout: float = 120) -> Any:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)
    assert done.returncode == 0, f"worker {args} failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict[str, Any]]:
    return run_worker("interpret", interpret=True)


@NEEDS_INTERPRETER
@pytest.mark.parametrize("case", interpreter_cases(), ids=case_id)
def test_triton_interpreter_matches_reference(case: dict[str, Any],
                                              interpreter_results: dict[str, dict[str, Any]]) -> None:
    result = interpreter_results[case_id(case)]
    # Measured: ≤ 3e-6 for every dtype (fp16/bf16 products are exact in fp32, so the kernel
    # and the upcasting reference differ only in summation order); half gets headroom for
    # a GPU's different accumulation order.
    tolerance = 1e-5 if case["dtype"] == "float32" else 1e-4
    assert result["nan_match"]
    assert result["error"] <= tolerance, result
    if case.get("uniform") and not case.get("tail"):
        assert result["exact_one"], result


@pytest.fixture(scope="module")
def batched_results() -> dict[str, dict[str, Any]]:
    return run_worker("batched", interpret=True)


@NEEDS_INTERPRETER
@pytest.mark.parametrize("name,estimator,sizes", BATCHED_CASES)
def test_layer_batches_match_layers_one_by_one(name: str, estimator: str, sizes: list[int],
                                               batched_results: dict[str, dict[str, Any]]) -> None:
    """A GPU capture reduces several layers per Triton launch: the result must not depend on how
    the layers were grouped, and the groups must be what the memory budget allows."""
    result = batched_results[f"{name}-{estimator}"]
    assert result["sizes"] == sizes, result
    assert result["layers"] and result["nan_match"] and result["flushed"] in (True, None), result
    assert result["error"] <= 1e-5, result


@NEEDS_TRITON
def test_triton_kernels_compile_for_sm90() -> None:
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend on this machine")
    sizes = run_worker("compile")
    assert len(sizes) == 9 and all(size > 0 for size in sizes.values()), sizes


def test_reference_memory_is_not_quadratic() -> None:
    """B=1, H=4, T=8192: one full fp32 T × T map for all heads would be 1 GiB."""
    full_map = 4 * 8192 * 8192 * 4
    measured = run_worker("memory")
    if "control" not in measured:
        measured.update(run_worker("memory", "control"))
    assert measured["control"] >= 0.9 * 512 * 2 ** 20, measured   # the method sees allocations
    assert measured["reference"] < full_map / 4, measured


def main(mode: str, *args: str) -> None:
    if mode == "interpret":
        results = {case_id(case): run_interpreter_case(case) for case in interpreter_cases()}
    elif mode == "batched":
        results = {f"{name}-{estimator}": run_batched_case(name, estimator) for name, estimator, _ in BATCHED_CASES}
    elif mode == "compile":
        results = compile_for_sm90()
    else:
        results = peak_extra_bytes(control_only=args == ("control",))
    print(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
