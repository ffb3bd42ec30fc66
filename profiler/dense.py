"""Dense distance estimator: every query's attention, normalised against uniform, binned by distance.

For one attention layer call (post-RoPE `query` (B, H, T, D), `key` (B, KV, T, D) with GQA
unexpanded: head h reads kv head h // (H // KV)) and for every head:

    D_h(d) = (1 / c(d)) · Σ_{i : key i−d visible from i} n_i · P_h[i, i−d],   d = 0 … T−1

P_h[i, ·] is the softmax of query i over its visible keys (key j is visible iff j ≤ i, and
i − window < j with a sliding window), n_i is the number of visible keys of row i
(i + 1, or min(i + 1, window)), and c(d) is the number of queries that see a key at distance d
(T − d for d < window, else 0; see `dense_counts`). Multiplying by n_i normalises against
uniform attention: a head that attends uniformly gives exactly 1.0 at every visible distance.
D(0) is the mean over all T queries of n_i · P[i, i] (self-attention relative to uniform).
Distances no query can see (d ≥ window) have c(d) = 0 and are NaN: an empty mean, never to be
mistaken for "no attention".

`scaling` is the logit scale the layer uses (None: 1/sqrt(D), as transformers' sdpa path).
Three entry points, all returning a float32 (B, H, T) tensor:
- `dense_profile_reference`: chunked torch (CPU or GPU), O(chunk · T) extra memory per head.
- `dense_profile_triton`: two Triton kernels (CUDA, or Triton's CPU interpreter with
  TRITON_INTERPRET=1), O(T) extra memory.
- `dense_profile`: picks one of them.
`tail_profile_triton` runs the same kernels on the last W queries for the tail-window
estimator (capture.py), and `profile_triton` computes both from one pass: given the layers'
logsumexp, one kernel launch whatever T, for one layer or (capture.LayerBatch) several stacked
as heads (a GPU forward pass is bound by launches, not arithmetic, up to several thousand tokens).
A further mask (chunked attention, as transformers passes it to SDPA) is honoured by the torch
reference: visibility then means what the mask allows, for n_i and c(d) alike.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

__all__ = [
    "TritonBlocks",
    "profile_triton",
    "tail_profile_triton",
    "dense_counts",
    "dense_profile",
    "dense_profile_reference",
    "dense_profile_triton",
    "triton_available",
]


def _check_inputs(query: torch.Tensor, key: torch.Tensor, sliding_window: int | None,
                  last_rows: bool = False) -> int:
    """Validate shapes/dtypes and return the effective window (T when there is none).
    `last_rows`: the query may hold only the last R ≤ T of the T queries."""
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query and key must be 4-D (B, H, T, D) and (B, KV, T, D); "
                         f"got {tuple(query.shape)} and {tuple(key.shape)}")
    batch, heads, rows, dim = query.shape
    kb, kv_heads, length, kd = key.shape
    if (kb, kd) != (batch, dim) or not (rows == length or last_rows and 1 <= rows <= length):
        raise ValueError(f"key {tuple(key.shape)} does not match query {tuple(query.shape)} "
                         f"in batch, length or head dim")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key/value heads")
    if length < 1:
        raise ValueError("sequence length must be at least 1")
    if not (query.is_floating_point() and key.is_floating_point()):
        raise ValueError(f"query and key must be floating point, got {query.dtype} and {key.dtype}")
    if sliding_window is None:
        return length
    if isinstance(sliding_window, bool) or int(sliding_window) != sliding_window or sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive integer or None, got {sliding_window!r}")
    return min(int(sliding_window), length)


def _scale(scaling: float | None, head_dim: int) -> float:
    """The logit scale; None means 1/sqrt(D), as in transformers' sdpa path."""
    return head_dim ** -0.5 if scaling is None else float(scaling)


def dense_counts(length: int, sliding_window: int | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """c(d), the number of queries that see a key at distance d: (T,) int64, T − d or 0.

    These are the denominators of the dense profile; bootstrap or pooling over probes of
    different lengths should weight by them.
    """
    window = length if sliding_window is None else min(int(sliding_window), length)
    dist = torch.arange(length, device=device)
    return torch.where(dist < window, length - dist, torch.zeros_like(dist))


@functools.lru_cache(maxsize=16)
def _divisors(length: int, window: int, device: torch.device) -> torch.Tensor:
    """c(d) as float32, NaN where it is 0: one division then gives the profile and its NaNs.
    Cached per length and device, so a capture divides with one kernel per layer."""
    counts = dense_counts(length, window, device=device)
    return counts.float().masked_fill(counts == 0, float("nan"))


def _finish(sums: torch.Tensor, window: int) -> torch.Tensor:
    """Divide the per-distance sums (B, H, T) by c(d); NaN where no query sees that distance."""
    return sums / _divisors(sums.shape[-1], window, sums.device)


def dense_profile_reference(query: torch.Tensor, key: torch.Tensor, scaling: float | None,
                            sliding_window: int | None = None, chunk: int = 256,
                            mask: torch.Tensor | None = None, empty: float = math.nan) -> torch.Tensor:
    """Chunked torch implementation of the dense profile, (B, H, T) float32.

    Queries are processed `chunk` rows at a time against only the keys they can see, so the
    largest temporaries are (B, H, chunk, min(T, chunk + window)) fp32: never T × T.
    Scores are computed in fp32 from upcast inputs with a max-subtracted softmax.
    Distance binning uses the skew trick (`_by_distance`).

    `mask` (B|1, 1|H, T, ≥T), True or 0.0 where a query may see a key (as transformers passes
    it to SDPA), hides more keys than causality and the sliding window do, e.g. chunked
    attention: then n_i counts the row's visible keys and c(d) the visible (query, key) pairs
    at distance d, so uniform attention still gives exactly 1.0 wherever c(d) > 0. Distances
    with c(d) = 0 get `empty`.
    """
    window = _check_inputs(query, key, sliding_window)
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = (kv_heads, heads // kv_heads)
    q = query.unflatten(1, groups)                             # (B, KV, G, T, D), head = kv·G + g
    k = key.float().unsqueeze(2)                               # (B, KV, 1, T, D)
    sums = torch.zeros(batch, *groups, length, dtype=torch.float32, device=query.device)
    counts = None if mask is None else torch.zeros_like(sums)
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        rows = end - start
        first_key = max(0, start - window + 1)
        span = end - first_key
        keys_rev = k[..., first_key:end, :].flip(-2)           # column c is key end − 1 − c
        scores = q[..., start:end, :].float() @ keys_rev.transpose(-1, -2)
        scores.mul_(_scale(scaling, dim))
        i = torch.arange(start, end, device=query.device).unsqueeze(1)
        j = (end - 1) - torch.arange(span, device=query.device).unsqueeze(0)
        hidden = (j > i) | (j <= i - window)
        if mask is None:
            visible_keys = torch.clamp(i + 1, max=window).to(torch.float32)
        else:
            hidden = hidden | ~_mask_block(mask, start, end, first_key, groups)
            visible = (~hidden).to(torch.float32)
            visible_keys = visible.sum(-1, keepdim=True)
            counts[..., :span] += _by_distance(visible.expand_as(scores))
        scores.masked_fill_(hidden, float("-inf"))
        # a row that sees no key (possible only with a mask) gets weight 0, not NaN
        row_max = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        weights = scores.sub_(row_max).exp_()
        # n_i / l_i as one row factor: uniform rows give exp(0) · (n / n) = 1.0 exactly.
        weights.mul_(visible_keys / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny))
        sums[..., :span] += _by_distance(weights)
    if counts is None:
        return _fill_unseen(_finish(sums.flatten(1, 2), window), sliding_window, empty)
    sums, counts = sums.flatten(1, 2), counts.flatten(1, 2)
    return torch.where(counts > 0, sums / counts.clamp_min(1.0), empty)


def _fill_unseen(profile: torch.Tensor, sliding_window: int | None, empty: float) -> torch.Tensor:
    """Put `empty` at the distances no query sees (d ≥ sliding window), NaN by `_finish`."""
    if math.isnan(empty) or sliding_window is None or sliding_window >= profile.shape[-1]:
        return profile
    return profile.masked_fill(dense_counts(profile.shape[-1], sliding_window, device=profile.device) == 0, empty)


def _by_distance(block: torch.Tensor) -> torch.Tensor:
    """Per-distance sums (..., span) of a (..., rows, span) block whose column c is key end − 1 − c.

    Row r, column c sits at distance d = (1 − rows) + r + c. Padding each row with `rows` zeros
    and re-reading the buffer with a row width one shorter shifts row r right by r, so a column
    sum gives the sum along each anti-diagonal r + c; the first rows − 1 of them are the
    negative distances (keys after the query), which hold nothing."""
    rows, span = block.shape[-2:]
    skewed = F.pad(block, (0, rows)).flatten(-2)[..., : rows * (span + rows - 1)]
    return skewed.unflatten(-1, (rows, span + rows - 1)).sum(-2)[..., rows - 1:]


def _mask_block(mask: torch.Tensor, start: int, end: int, first_key: int,
                groups: tuple[int, int]) -> torch.Tensor:
    """The mask's visibility (True = seen) for queries start … end − 1 and keys first_key …
    end − 1 in the scores' flipped key order, shaped to broadcast against (B, KV, G, rows, span)."""
    block = mask_visibility(mask[..., start:end, first_key:end].flip(-1))
    return block.unsqueeze(2) if block.shape[1] == 1 else block.unflatten(1, groups)


def mask_visibility(mask: torch.Tensor) -> torch.Tensor:
    """An attention mask as SDPA takes it, as booleans (True = seen): boolean masks as they are,
    additive ones (0 seen, the dtype's most negative value hidden) compared against half of it."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


@dataclasses.dataclass(frozen=True)
class TritonBlocks:
    """Tile sizes and warps of the two Triton kernels (tiles: powers of two, at least 16 for tl.dot).

    stats_m × stats_n: query × key tile of the softmax-statistics pass, run by stats_warps warps.
    rows × dists: query × distance tile of the binning pass; one program owns `dists`
    distances and `rows_per_program` queries, keeps their sums in registers and runs
    bins_warps warps. The defaults for each dtype and head dim come from `TUNED_BLOCKS_FILE`.
    """

    stats_m: int = 64
    stats_n: int = 64
    stats_warps: int = 8
    rows: int = 16
    dists: int = 64
    rows_per_program: int = 256
    bins_warps: int = 8

    def __post_init__(self) -> None:
        for name in ("stats_m", "stats_n", "rows", "dists", "rows_per_program"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TritonBlocks.{name} must be a power of two >= 16, got {value}")
        for name in ("stats_warps", "bins_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16):
                raise ValueError(f"TritonBlocks.{name} must be 1, 2, 4, 8 or 16, got {getattr(self, name)}")
        if self.dists < self.rows or self.rows_per_program < self.rows:
            raise ValueError("TritonBlocks.dists and rows_per_program must be multiples of rows")

    @classmethod
    @functools.cache
    def for_dtype(cls, dtype: torch.dtype, head_dim: int = 64) -> "TritonBlocks":
        """The tuned tiles for this input dtype and head dim (see `TUNED_BLOCKS_FILE`); cached."""
        table = _tuned_blocks()
        if dtype == torch.float32:
            return cls(**table["float32"])
        return cls(**table["half"]["d64" if head_dim <= 64 else "d128"])


# Tiles per dtype and head dim: written by benchmarks/tune_dense.py (--save) from timings on a
# GPU; the file records where. fp32 tiles hold twice the bytes: its entry is not timed, only
# compiled without spills for sm_90. Read once per process.
TUNED_BLOCKS_FILE = Path(__file__).parent / "data" / "triton_blocks.json"


@functools.cache
def _tuned_blocks() -> dict[str, Any]:
    return json.loads(TUNED_BLOCKS_FILE.read_text())


@functools.cache
def _triton_kernels() -> dict[str, Any] | None:
    """Import triton and the kernels on first use; None when triton is missing."""
    try:
        import triton

        from . import dense_triton
    except ImportError:
        return None
    return {"triton": triton, "row_stats": dense_triton.row_stats_kernel,
            "distance_bins": dense_triton.distance_bins_kernel}


def triton_available() -> bool:
    """True when triton imports (the kernels still need CUDA tensors or TRITON_INTERPRET=1)."""
    return _triton_kernels() is not None


def _kernel_constants(dtype: torch.dtype, head_dim: int, blocks: TritonBlocks, interpreted: bool = False,
                      dense: bool = True, tail: bool = False, has_sum: bool = True
                      ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Compile-time arguments and launch options of row_stats and of distance_bins.

    Returns (stats constants, bins constants, stats options, bins options). Pass 2 computes the
    dense sums (`dense`), the tail window's statistics (`tail`) or both, and reads row sums
    from pass 1 unless given a logsumexp (`has_sum` False). Shared with the tests, which compile
    the kernels ahead of time for a CUDA target.
    """
    # Triton's interpreter keeps bf16 as uint16 and its tl.dot cannot multiply them; upcast
    # there (exact: bf16 × bf16 products are exact in fp32, as in the GPU's fp32 accumulator).
    dot_fp32 = interpreted and dtype == torch.bfloat16
    shared = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()),
                  PRECISION="ieee" if dtype == torch.float32 or dot_fp32 else "tf32",
                  DOT_FP32=dot_fp32)
    stats = dict(shared, BLOCK_M=blocks.stats_m, BLOCK_N=blocks.stats_n)
    bins = dict(shared, ROWS=blocks.rows, DISTS=blocks.dists, ROWS_PER_PROGRAM=blocks.rows_per_program,
                DENSE=dense, TAIL=tail, HAS_L=has_sum)
    # No FMA contraction: both passes round score = dot · scale alike, as the reference does.
    return (stats, bins, dict(num_warps=blocks.stats_warps, enable_fp_fusion=False),
            dict(num_warps=blocks.bins_warps, enable_fp_fusion=False))


def _runtime_args(query: torch.Tensor, key: torch.Tensor, scaling: float | None, window: int,
                  row_lo: int) -> dict[str, Any]:
    """The kernels' run-time arguments: sizes, the first query row to compute, the first one
    `query` holds (it may hold the last rows only), the log2-unit logit scale and every stride."""
    return dict(
        T=key.shape[2], H=query.shape[1], G=query.shape[1] // key.shape[1], window=window, row_lo=row_lo,
        q_first=key.shape[2] - query.shape[2],
        qk_scale=_scale(scaling, query.shape[3]) * math.log2(math.e),
        stride_qb=query.stride(0), stride_qh=query.stride(1),
        stride_qt=query.stride(2), stride_qd=query.stride(3),
        stride_kb=key.stride(0), stride_kh=key.stride(1),
        stride_kt=key.stride(2), stride_kd=key.stride(3),
    )


def _on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make the tensor's CUDA device current: Triton launches on the current device, and with
    --device-map a layer's tensors may live on cuda:1 while cuda:0 is current."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _row_stats_triton(query: torch.Tensor, key: torch.Tensor, scaling: float | None, window: int,
                      blocks: TritonBlocks, row_lo: int = 0) -> torch.Tensor:
    """Pass 1 over queries row_lo … T−1: each row's softmax max and sum in log2 units, a
    (2, B·H·(T − row_lo)) fp32 tensor."""
    kernels = _triton_kernels()
    (batch, heads, _, dim), length = query.shape, key.shape[2]
    stats, _, options, _ = _kernel_constants(query.dtype, dim, blocks, not query.is_cuda)
    rows = torch.empty(2, batch * heads * (length - row_lo), dtype=torch.float32, device=query.device)
    grid = (kernels["triton"].cdiv(length - row_lo, blocks.stats_m), batch * heads)
    with _on_device(query):
        kernels["row_stats"][grid](query, key, rows[0], rows[1],
                                   **_runtime_args(query, key, scaling, window, row_lo), **stats, **options)
    return rows


@dataclasses.dataclass
class Pass2:
    """What pass 2 returns: `dense` (B, H, T) sums of n_i · P by distance, not yet divided;
    `tail` (B, H, T) the tail rows' P / W by distance (A(d) for d ≤ T − W); `rowstats`
    (2, B·H, W): each tail row's Σ p ln p and its P on key 0. None where not asked for."""
    dense: torch.Tensor | None
    tail: torch.Tensor | None
    rowstats: torch.Tensor | None


def _distance_bins_triton(query: torch.Tensor, key: torch.Tensor, scaling: float | None, window: int,
                          blocks: TritonBlocks, row_max: torch.Tensor, row_sum: torch.Tensor | None, *,
                          row_lo: int = 0, dense: bool = True, tail_window: int = 0,
                          max_scale: float = 1.0) -> Pass2:
    """Pass 2 over queries row_lo … T−1, P from row_max · max_scale (log2 units) and row_sum
    (None: 1, as for a logsumexp). `dense`: the dense sums; `tail_window` W > 0: also the tail
    statistics of the last W rows (causal attention without a sliding window only)."""
    kernels = _triton_kernels()
    (batch, heads, _, dim), length = query.shape, key.shape[2]
    _, bins, _, options = _kernel_constants(query.dtype, dim, blocks, not query.is_cuda, dense,
                                            tail_window > 0, row_sum is not None)
    bh = batch * heads
    sizes = [bh * length if dense else 0, bh * length if tail_window else 0, 2 * bh * tail_window]
    dense_sums, tail_sums, rowstats = torch.zeros(sum(sizes), dtype=torch.float32,
                                                  device=query.device).split(sizes)
    cdiv = kernels["triton"].cdiv
    first_row = row_lo // blocks.rows * blocks.rows
    grid = (cdiv(window, blocks.dists) + 1, cdiv(length - first_row, blocks.rows_per_program), bh)
    with _on_device(query):
        kernels["distance_bins"][grid](query, key, row_max, row_max if row_sum is None else row_sum,
                                       dense_sums, tail_sums, rowstats,
                                       **_runtime_args(query, key, scaling, window, row_lo),
                                       tail_lo=length - tail_window, m_scale=max_scale, **bins, **options)
    shape = (batch, heads, length)
    return Pass2(dense_sums.view(shape) if dense else None, tail_sums.view(shape) if tail_window else None,
                 rowstats.view(2, bh, tail_window) if tail_window else None)


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels read a query of `dtype` in: its own if they take it, else float32."""
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def _kernel_inputs(query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the kernels can run here and bring query and key to one dtype they take."""
    if not query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for "
                         "Triton's CPU interpreter); use backend='torch' on CPU")
    if _triton_kernels() is None:
        raise RuntimeError("the triton backend needs the 'triton' package (pip install triton)")
    dtype = kernel_dtype(query.dtype)
    return query.to(dtype), key.to(dtype)


@functools.lru_cache(maxsize=16)
def _tail_weights(length: int, window: int, device: torch.device) -> torch.Tensor:
    """(2, W, 1): −1 / (W · ln(visible keys)) for the rows' Σ p ln p, 1 / W for their sink
    mass, so that one batched product turns the per-row values into the window means."""
    visible = torch.arange(length - window + 1, length + 1, dtype=torch.float64).clamp(min=2)
    weights = torch.stack([-1.0 / (window * visible.log()), torch.full_like(visible, 1.0 / window)])
    return weights.float().unsqueeze(-1).to(device)


def profile_triton(query: torch.Tensor, key: torch.Tensor, scaling: float | None, *, dense: bool = True,
                   tail_window: int = 0, sliding_window: int | None = None,
                   logsumexp: torch.Tensor | None = None, blocks: TritonBlocks | None = None
                   ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """The dense profile and/or the tail-window statistics from one pass over the scores.

    Returns (dense profile (B, H, T) or None, (A (B, H, T − W + 1), sink (B, H), entropy (B, H))
    or None). Pass 1 (row max and sum) runs unless `logsumexp` (B, H, R), natural log, as a
    fused attention returns it beside its output, is given; then one kernel launch does it all.
    The tail statistics need causal attention without a sliding window. `query` (B, H, R, D)
    may hold only the last R ≥ W of the T queries when the dense profile is not asked for:
    the tail needs no others (capture.py keeps just those).
    """
    window = _check_inputs(query, key, sliding_window, last_rows=not dense)
    (batch, heads, rows, _), length = query.shape, key.shape[2]
    if not (dense or tail_window):
        raise ValueError("nothing to compute: ask for the dense profile, a tail window or both")
    if tail_window and not (1 <= tail_window <= rows and window == length):
        raise ValueError(f"the tail window must be in 1 … {rows}, without a sliding window "
                         f"(got {tail_window}, sliding window {sliding_window})")
    query, key = _kernel_inputs(query, key)
    blocks = blocks or TritonBlocks.for_dtype(query.dtype, query.shape[3])
    row_lo = 0 if dense else length - tail_window
    if logsumexp is None:
        row_max, row_sum = _row_stats_triton(query, key, scaling, window, blocks, row_lo)
        sums = _distance_bins_triton(query, key, scaling, window, blocks, row_max, row_sum, row_lo=row_lo,
                                     dense=dense, tail_window=tail_window)
    else:
        if logsumexp.shape != query.shape[:3]:
            raise ValueError(f"logsumexp must be (B, H, R) = {tuple(query.shape[:3])}, got {tuple(logsumexp.shape)}")
        natural = logsumexp.float()[..., row_lo - (length - rows):].contiguous().view(-1)
        sums = _distance_bins_triton(query, key, scaling, window, blocks, natural, None, row_lo=row_lo,
                                     dense=dense, tail_window=tail_window,
                                     max_scale=math.log2(math.e))      # pass 2 works in log2 units
    tail = None
    if tail_window:
        entropy, sink = torch.bmm(sums.rowstats, _tail_weights(length, tail_window, query.device)).view(
            2, batch, heads)
        tail = (sums.tail[..., : length - tail_window + 1], sink, entropy)
    return (_finish(sums.dense, window) if dense else None), tail


def dense_profile_triton(query: torch.Tensor, key: torch.Tensor, scaling: float | None,
                         sliding_window: int | None = None, *,
                         blocks: TritonBlocks | None = None,
                         logsumexp: torch.Tensor | None = None) -> torch.Tensor:
    """Triton implementation of the dense profile, (B, H, T) float32, O(T) extra memory.

    Pass 1 stores each row's softmax max and sum ((B, H, T) each); pass 2 recomputes the
    scores tile by tile and bins n_i · P[i, j] by distance into a (B, H, T) fp32 buffer.
    `logsumexp` (B, H, T), natural log, as a fused attention (cuDNN, flash) returns it, is
    exactly what pass 1 would compute: given it, pass 1 is skipped (max = logsumexp, sum = 1).
    With a sliding window it must be the windowed attention's logsumexp.
    Inputs stay in their dtype (fp16/bf16 products are exact in the fp32 accumulator; fp32
    inputs use IEEE fp32 dots, not TF32). Any strides are accepted, so transposed views
    from (B, T, H, D) projections need no copy. Sums of floats reach the output through
    atomics, so the last bit may differ between runs.
    """
    return profile_triton(query, key, scaling, sliding_window=sliding_window, logsumexp=logsumexp,
                          blocks=blocks)[0]


def tail_profile_triton(query: torch.Tensor, key: torch.Tensor, scaling: float | None, window: int, *,
                        logsumexp: torch.Tensor | None = None, blocks: TritonBlocks | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tail-window statistics of causal attention through the same kernels, on the last
    `window` queries only: A (B, H, T − W + 1), A(d) = mean_i P[i, i − d]; sink (B, H), the
    mean mass on key 0; entropy (B, H), the mean of each row's entropy over ln(its visible
    keys). All float32, O(T) extra memory. Given the layer's `logsumexp`, one kernel launch.
    A and entropy reach memory through atomics (the last bit may differ between runs)."""
    return profile_triton(query, key, scaling, dense=False, tail_window=window, logsumexp=logsumexp,
                          blocks=blocks)[1]


def dense_profile(query: torch.Tensor, key: torch.Tensor, scaling: float | None,
                  sliding_window: int | None = None,
                  backend: Literal["auto", "triton", "torch"] = "auto",
                  logsumexp: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                  empty: float = math.nan) -> torch.Tensor:
    """Dense distance profile (B, H, T) float32; see the module docstring for the definition.

    backend="auto" runs the Triton kernels on CUDA tensors when triton imports and the
    chunked torch reference otherwise; "triton" or "torch" force one. `logsumexp`, the
    rows' softmax normalisers from the layer's own fused attention, saves the kernels a
    pass; the reference computes its own. A `mask` (see `dense_profile_reference`) takes the
    reference, as the kernels know only causality and sliding windows. `empty`: the value at
    distances no query sees (NaN: an empty mean; capture.py puts 0.0, no attention there).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if mask is not None:
        if backend == "triton":
            raise ValueError("the Triton kernels take no mask (causal attention and sliding windows only)")
        return dense_profile_reference(query, key, scaling, sliding_window, mask=mask, empty=empty)
    if backend == "triton" or backend == "auto" and query.is_cuda and triton_available():
        return _fill_unseen(dense_profile_triton(query, key, scaling, sliding_window, logsumexp=logsumexp),
                            sliding_window, empty)
    return dense_profile_reference(query, key, scaling, sliding_window, empty=empty)
