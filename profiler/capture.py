"""Capture: reduce every layer's attention to per-head distance statistics during the forward pass.

The streaming path registers an attention function named "attnprof" with transformers'
`AttentionInterface`. Each attention layer hands it post-RoPE queries (B, H, T, D) and keys
(B, KV, T, D); it computes the statistics for the last W queries (the tail window), then returns
the normal SDPA output, so the forward pass is the model's own. Memory is O(W·T) per block of
heads; no T×T map is ever built. On CUDA, where a forward pass is bound by kernel launches up to
several thousand tokens, layers are not reduced one by one: the Recorder copies their keys and
queries (the last W, or all for the dense profile) into a `LayerBatch`, and the Triton kernels
(dense.py) reduce several layers per launch in O(T) memory per layer: two launches for the tail,
one for the dense profile, whose layers run their attention through PyTorch's cuDNN or flash
kernel for its per-row logsumexp. The fallback path hooks eager attention modules and reduces the
weights they return with the same reduction; the two agree (tests/test_capture.py).

Tail-window estimator, for a probe of length T and queries i in [T-W, T):
    A_h(d) = mean_i softmax_j(q_i·k_j·scale)[j = i-d],   0 <= d <= T-W
plus the mass on key 0 (sink), on d <= 2 (local) and the row entropy / ln(visible keys).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch

from . import rules
from .errors import AttnprofError

RunOutput = TypeVar("RunOutput")         # what the capture loop run by _with_fallback returns
ATTN_NAME = "attnprof"
HEAD_BLOCK_BYTES = 64 * 2**20     # scores of one head block stay under this
BATCH_BYTES = 256 * 2**20         # the layers' copies kept for one batched kernel launch stay under this
MAX_GRID = 65535                  # CUDA's limit on a launch grid's y and z sizes: B · layers · H of a batch
ESTIMATORS = ("tail", "dense", "taf")


@functools.lru_cache(maxsize=1)
def limit_heap_growth() -> bool:
    """Serve large CPU allocations from mmap, so freed activations go back to the OS.

    glibc raises its mmap threshold after large blocks are freed, after which a forward pass's
    activations come from the heap and fragment it: measured here, peak RSS of an 8-probe
    T=2048 profile of SmolLM2-135M grew from 1.1 GB to 11 GB. Fixing the threshold at 1 MiB
    (mallopt M_MMAP_THRESHOLD) keeps it at 1.1 GB. A no-op where glibc is not the allocator."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20))          # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def check_window(window: int, length: int, option: str = "window") -> None:
    """Refuse a tail window that does not fit the probe: at least 1 query and fewer than T."""
    if not 1 <= window < length:
        raise AttnprofError(f"{option} {window}: the tail window must hold at least 1 and fewer than the "
                            f"probe length's {length} queries")


def default_window(length: int) -> int:
    """W = min(256, T/8): enough queries to average, all seeing nearly the same context."""
    return max(1, min(256, length // 8))


@dataclass
class LayerStats:
    """Statistics of one layer for a batch: A (B, H, M), sink/local/entropy (B, H)."""
    A: torch.Tensor
    sink: torch.Tensor
    local: torch.Tensor
    entropy: torch.Tensor


STAT_FIELDS = ("A", "sink", "local", "entropy")    # the per-head statistics, in LayerStats order


MASKED = -1e30     # finite "minus infinity": exp() gives exactly 0 and 0 · MASKED stays 0


def _visible_tail(mask: torch.Tensor | None, length: int, window: int, device) -> torch.Tensor:
    """Boolean (B|1, 1|H, W, T) visibility of keys for the tail queries (True = attended)."""
    if mask is None:
        rows = torch.arange(length - window, length, device=device)[:, None]
        return (torch.arange(length, device=device)[None, :] <= rows)[None, None]
    from .dense import mask_visibility
    return mask_visibility(mask[..., length - window:, :length])


def _tail_profile(probs: torch.Tensor) -> torch.Tensor:
    """A(d) = mean over tail rows r of probs[r, T-W+r-d], d = 0..T-W, without copying.

    Row r's keys r, r+1, ..., r+T-W lie on a stride-(T+1) diagonal band of the contiguous
    (W, T) block, so a strided view sums them in one pass (then flip e = T-W-d to d)."""
    probs = probs.contiguous()
    batch, heads, window, length = probs.shape
    span = length - window + 1
    band = probs.as_strided((batch, heads, window, span),
                            (heads * window * length, window * length, length + 1, 1))
    return band.mean(dim=2).flip(-1)


def reduce_tail(probs: torch.Tensor, visible_count: torch.Tensor, plogp_sum: torch.Tensor | None = None
                ) -> LayerStats:
    """Reduce tail-query attention rows (B, H, W, T) to distance statistics (float32).

    visible_count: keys each row may attend to (for the entropy's normalisation), broadcastable
    to (B, H, W); plogp_sum: Σ p·ln p per row when the caller has it from log-probabilities."""
    A = _tail_profile(probs)
    sink = probs[..., 0].mean(dim=-1)
    local = A[..., : rules.LOCAL_MAX_DISTANCE + 1].sum(dim=-1)
    if plogp_sum is None:
        plogp_sum = torch.special.xlogy(probs, probs).sum(dim=-1)
    entropy = (-plogp_sum / torch.log(visible_count.clamp_min(2).to(probs.dtype))).mean(dim=-1)
    return LayerStats(A, sink, local, entropy)


def layer_stats(query: torch.Tensor, key: torch.Tensor, scaling: float, mask: torch.Tensor | None,
                window: int, dense: bool = False, sliding_window: int | None = None,
                logsumexp: torch.Tensor | None = None) -> LayerStats:
    """One attention layer's statistics from post-RoPE queries and (unexpanded GQA) keys: the
    tail window's, with A replaced by the dense profile when `dense`.

    On CUDA, for causal attention (no mask), Triton kernels (dense.py) compute them in one pass
    over the scores: one launch per layer given the layer's `logsumexp` (from its fused
    attention), two without. A GPU forward pass is bound by launches up to several thousand
    tokens, and the torch path takes thirty. Elsewhere, or with a mask: `tail_stats_torch` and
    `dense_profile` (its torch reference, which honours the mask). The paths agree (tests/test_dense.py, tests/test_gpu.py)."""
    from .dense import dense_profile, profile_triton, triton_available
    length = query.shape[2]
    causal = mask is None and (sliding_window is None or sliding_window >= length)
    if causal and query.is_cuda and length > 1 and triton_available():
        return _kernel_stats(*profile_triton(query, key, scaling, dense=dense, tail_window=window,
                                             sliding_window=sliding_window, logsumexp=logsumexp))
    stats = tail_stats_torch(query, key, scaling, mask, window)
    if dense:                       # no query sees a distance beyond a sliding window: 0 there
        if mask is not None and _is_band(mask, length, sliding_window):
            mask = None             # sliding layers get their band as a mask too; the kernels know it
        stats.A = dense_profile(query, key, scaling, sliding_window=sliding_window, logsumexp=logsumexp,
                                mask=mask, empty=0.0)
    return stats


def _is_band(mask: torch.Tensor, length: int, sliding_window: int | None, rows: int = 1024) -> bool:
    """Whether the mask shows exactly causal attention (within the sliding window, if any), as
    transformers builds it for sliding layers; compared `rows` queries at a time, one sync."""
    from .dense import mask_visibility
    window = length if sliding_window is None else min(sliding_window, length)
    keys = torch.arange(mask.shape[-1], device=mask.device)[None, :]
    same = torch.ones((), dtype=torch.bool, device=mask.device)
    for start in range(0, length, rows):
        block = mask_visibility(mask[..., start:start + rows, :])
        i = torch.arange(start, start + block.shape[-2], device=mask.device)[:, None]
        same &= (block == ((keys <= i) & (keys > i - window))).all()
    return bool(same)


def _kernel_stats(profile: torch.Tensor | None, tail: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                  ) -> LayerStats:
    """LayerStats from what dense.profile_triton returns: A is the dense profile where there is one."""
    A, sink, entropy = tail
    return LayerStats(A if profile is None else profile, sink, A[..., : rules.LOCAL_MAX_DISTANCE + 1].sum(dim=-1),
                      entropy)


def tail_stats(query: torch.Tensor, key: torch.Tensor, scaling: float, mask: torch.Tensor | None,
               window: int) -> LayerStats:
    """Tail-window statistics (see `layer_stats`): Triton kernels on CUDA, torch elsewhere."""
    return layer_stats(query, key, scaling, mask, window)


def tail_stats_torch(query: torch.Tensor, key: torch.Tensor, scaling: float, mask: torch.Tensor | None,
                     window: int) -> LayerStats:
    """Tail-window statistics in torch (CPU, masks, or no triton). Query heads that share a
    key/value head are multiplied against it in one matmul (no expanded copy of the keys);
    blocks of key/value heads keep the scores under HEAD_BLOCK_BYTES."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    causal_only = mask is None
    if causal_only:      # only the last W keys are partly hidden from the tail queries
        hidden = torch.ones(window, window, dtype=torch.bool, device=query.device).triu(1)
        counts = torch.arange(length - window + 1, length + 1, device=query.device, dtype=torch.float32)
    else:
        visible = _visible_tail(mask, length, window, query.device)
        counts = visible.sum(dim=-1).float()
    per_block = max(1, HEAD_BLOCK_BYTES // max(1, batch * groups * window * length * 4))
    parts = []
    for g0 in range(0, kv_heads, per_block):
        g1 = min(kv_heads, g0 + per_block)
        q = query[:, g0 * groups:g1 * groups, length - window:, :].float() * scaling
        q = q.reshape(batch, g1 - g0, groups * window, dim)
        k = key[:, g0:g1].float()
        scores = torch.matmul(q, k.transpose(-1, -2)).view(batch, (g1 - g0) * groups, window, length)
        if causal_only:
            scores[..., length - window:].masked_fill_(hidden, MASKED)
            cnt = counts
        else:
            vis = visible if visible.shape[1] == 1 else visible[:, g0 * groups:g1 * groups]
            scores.masked_fill_(~vis, MASKED)
            cnt = counts if counts.shape[1] == 1 else counts[:, g0 * groups:g1 * groups]
        shifted = scores.sub_(scores.amax(dim=-1, keepdim=True))      # s - max, in place
        probs = shifted.exp()
        norm = probs.sum(dim=-1, keepdim=True)
        probs.div_(norm)
        plogp = torch.linalg.vecdot(probs, shifted) - torch.log(norm[..., 0])   # Σ p ln p
        parts.append(reduce_tail(probs, cnt, plogp))
    return LayerStats(*(torch.cat([getattr(p, f) for p in parts], dim=1) for f in STAT_FIELDS))


@dataclass
class LayerBatch:
    """Layers whose statistics wait for one Triton launch over all of them (see Recorder): copies
    of their queries (the last R rows: the tail window's, or all with the dense profile), keys and
    fused attention's logsumexp, stacked so that the layers' heads read as one layer's heads."""
    signature: tuple
    scaling: float
    queries: torch.Tensor                 # (B, capacity, H, R, D)
    keys: torch.Tensor                    # (B, capacity, KV, T, D)
    logsumexp: torch.Tensor | None        # (B, capacity, H, R)
    layers: list[int]

    @staticmethod
    def layer_bytes(query: torch.Tensor, key: torch.Tensor, rows: int, logsumexp: bool) -> int:
        """What one layer's copies take: `rows` queries, all keys, and the rows' fp32 logsumexp."""
        from .dense import kernel_dtype
        (batch, heads, length, dim), kv_heads = query.shape, key.shape[1]
        return kernel_dtype(query.dtype).itemsize * batch * dim * (heads * rows + kv_heads * length) \
            + (4 * batch * heads * rows if logsumexp else 0)

    @classmethod
    def empty(cls, signature: tuple, scaling: float, capacity: int, query: torch.Tensor, key: torch.Tensor,
              rows: int, logsumexp: bool) -> "LayerBatch":
        from .dense import kernel_dtype
        (batch, heads, length, dim), kv_heads = query.shape, key.shape[1]
        new = functools.partial(torch.empty, dtype=kernel_dtype(query.dtype), device=query.device)
        return cls(signature, scaling, new(batch, capacity, heads, rows, dim),
                   new(batch, capacity, kv_heads, length, dim),
                   torch.empty(batch, capacity, heads, rows, dtype=torch.float32, device=query.device)
                   if logsumexp else None, [])

    @property
    def full(self) -> bool:
        return len(self.layers) == self.queries.shape[1]

    def add(self, idx: int, query: torch.Tensor, key: torch.Tensor, logsumexp: torch.Tensor | None) -> None:
        n, first = len(self.layers), query.shape[2] - self.queries.shape[3]
        self.queries[:, n].copy_(query[:, :, first:])
        self.keys[:, n].copy_(key)
        if self.logsumexp is not None:
            self.logsumexp[:, n].copy_(logsumexp[..., first:])
        self.layers.append(idx)

    def run(self, window: int, dense: bool) -> dict[int, LayerStats]:
        """One launch (two without a logsumexp: pass 1 first) for every layer held; their statistics."""
        from .dense import profile_triton
        n, heads = len(self.layers), self.queries.shape[2]
        stats = _kernel_stats(*profile_triton(
            self.queries[:, :n].flatten(1, 2), self.keys[:, :n].flatten(1, 2), self.scaling, dense=dense,
            tail_window=window, logsumexp=None if self.logsumexp is None else self.logsumexp[:, :n].flatten(1, 2)))
        fields = [getattr(stats, f).unflatten(1, (n, heads)) for f in STAT_FIELDS]
        return {idx: LayerStats(*(t[:, k] for t in fields)) for k, idx in enumerate(self.layers)}


class Recorder:
    """Collects one forward pass's per-layer statistics, keyed by layer index.

    On CUDA a GPU forward pass is bound by kernel launches up to several thousand tokens, so
    layers of causal attention are not reduced one by one: their queries and keys are copied
    into a `LayerBatch` (up to `batch_bytes` of copies) and the Triton kernels reduce them all
    in one or two launches, when it is full and in `flush` (which `finish` and the end of
    `recording` call). The tail estimator then needs only the last W queries; the layer's
    attention stays plain SDPA. `batch_layers`: None batches on CUDA, True also elsewhere
    (Triton's interpreter, in tests), False never. `fused_attention` False keeps every layer's
    attention SDPA (the kernels then compute the normalisers themselves), for benchmarks.
    """

    def __init__(self, estimator: str, window: int, batch_layers: bool | None = None,
                 batch_bytes: int = BATCH_BYTES, fused_attention: bool = True):
        self.estimator = estimator
        self.window = window
        self.batch_layers = batch_layers
        self.batch_bytes = batch_bytes
        self.fused_attention = fused_attention
        self.layers: dict[int, LayerStats] = {}
        self._calls = 0
        self._batch: LayerBatch | None = None

    def _capacity(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                  sliding_window: int | None) -> int:
        """How many layers like this one a batch holds; 0 where this layer cannot be batched
        (a mask, a sliding window, a length the queries and keys do not share, no triton)."""
        from .dense import triton_available
        batch, heads, length, _ = query.shape
        if (self.batch_layers is False or mask is not None or length <= 1 or key.shape[2] != length
                or (sliding_window is not None and sliding_window < length)
                or not (query.is_cuda or self.batch_layers) or not triton_available()):
            return 0
        dense = self.estimator == "dense"
        per_layer = LayerBatch.layer_bytes(query, key, self._kept_rows(length), logsumexp=dense)
        capacity = min(self.batch_bytes // per_layer, MAX_GRID // (batch * heads))
        return capacity if capacity >= 2 else 0

    def _kept_rows(self, length: int) -> int:
        """The queries a batch keeps of each layer: all for the dense profile, else the tail's."""
        return length if self.estimator == "dense" else self.window

    def wants_logsumexp(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                        sliding_window: int | None) -> bool:
        """Whether the layer's attention should run through a fused kernel for its logsumexp:
        the dense profile and layers reduced on their own use it; a batched tail needs none."""
        return self.fused_attention and (self.estimator == "dense"
                                         or not self._capacity(query, key, mask, sliding_window))

    def layer_index(self, module: torch.nn.Module) -> int:
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            idx = self._calls
        self._calls += 1
        return int(idx)

    def record(self, module, query, key, mask, scaling, sliding_window=None, logsumexp=None) -> None:
        idx = self.layer_index(module)
        if not self._add_to_batch(idx, module, query, key, mask, scaling, sliding_window, logsumexp):
            self.store(idx, layer_stats(query, key, scaling, mask, self.window, self.estimator == "dense",
                                        sliding_window, logsumexp))

    def _add_to_batch(self, idx, module, query, key, mask, scaling, sliding_window, logsumexp) -> bool:
        """Copy the layer into the open batch (opening one if needed); False where it cannot be
        batched or no batch fits on its device: then it is reduced on its own."""
        capacity = self._capacity(query, key, mask, sliding_window)
        if not capacity:
            return False
        signature = (query.shape, key.shape, query.device, query.dtype, scaling, logsumexp is not None)
        if self._batch is not None and self._batch.signature != signature:
            self.flush()
        if self._batch is None:
            total = getattr(getattr(module, "config", None), "num_hidden_layers", None)
            if isinstance(total, int) and total > idx:        # no room for layers the model lacks
                capacity = min(capacity, total - idx)
            try:
                self._batch = LayerBatch.empty(signature, scaling, capacity, query, key,
                                               self._kept_rows(query.shape[2]), logsumexp is not None)
            except torch.OutOfMemoryError:
                return False
        self._batch.add(idx, query, key, logsumexp)
        if self._batch.full:
            self.flush()
        return True

    def flush(self) -> None:
        """Reduce the layers waiting in a batch, if any (the end of a forward pass)."""
        if self._batch is not None and self._batch.layers:
            with torch.inference_mode():
                for idx, stats in self._batch.run(self.window, self.estimator == "dense").items():
                    self.store(idx, stats)
        self._batch = None

    def store(self, idx: int, stats: LayerStats) -> None:
        """Keep a layer's statistics where they were computed: a device-to-host copy here would
        stall a GPU forward pass at every layer; `finish` moves them all once the pass is done."""
        self.layers[idx] = LayerStats(*(getattr(stats, f).detach().float() for f in STAT_FIELDS))

    def finish(self) -> "Recorder":
        """After the forward pass: move every layer's statistics to the CPU (one stacked copy per
        field and device, not one per layer) and refuse NaN/inf, naming the lowest bad layer."""
        self.flush()
        by_device: dict[torch.device, list[int]] = {}
        for idx in sorted(self.layers):
            by_device.setdefault(self.layers[idx].A.device, []).append(idx)
        for device, indices in by_device.items():
            # from a GPU into pinned memory (non_blocking allocates it), then one wait: pageable
            # copies ran at ~2 GB/s, 20 ms per forward pass for A at T = 32K
            cuda = device.type == "cuda"
            host = {f: torch.stack([getattr(self.layers[i], f) for i in indices]).to("cpu", non_blocking=cuda)
                    for f in STAT_FIELDS}
            if cuda:              # then out of pinned memory, which is scarce: it returns to the cache
                torch.cuda.current_stream(device).synchronize()
                host = {f: t.clone() for f, t in host.items()}
            for k, idx in enumerate(indices):
                self.layers[idx] = LayerStats(*(host[f][k] for f in STAT_FIELDS))
        for idx in sorted(self.layers):
            if not torch.isfinite(self.layers[idx].A).all():
                raise AttnprofError(f"NaN or inf in the attention of layer {idx}: the model's weights or "
                                    "inputs are broken (try --dtype float32)")
        return self


_ACTIVE: list[Recorder] = []


# Attention features PyTorch's fused kernels do not implement; any of them set means the SDPA path.
_NOT_FUSED_KWARGS = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias")

# PyTorch's fused attention kernels that return the logsumexp beside the output, in the order
# tried: cuDNN's (what SDPA runs on Hopper GPUs), then flash (FA2); one that raises for a
# (device, dtype, head dim) is not tried there again. benchmarks/bench_dense.py times both.
LSE_BACKENDS = ("cudnn", "flash")
_FAILED: set[tuple] = set()       # (backend, device, dtype, head dim, GQA) that raised: not tried again


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _fused_with_logsumexp(backend: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.integrations.sdpa_attention import repeat_kv
    groups = query.shape[1] // key.shape[1]      # both want as many key/value heads as query heads
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)     # expand + reshape: no GPU wait
    if backend == "cudnn":
        result = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, 0.0, True, False, scale=scale)
    else:
        result = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, True, False, scale=scale)
    return result[0], result[1]


def attention_with_logsumexp(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float, scale: float,
                             kwargs: dict, backends: tuple[str, ...] = LSE_BACKENDS
                             ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layer's causal attention through a fused PyTorch kernel (cuDNN's or flash) that returns
    each query's softmax log-normaliser beside the output: ((B, T, H, D) output as
    sdpa_attention_forward returns it, (B, H, T) fp32 logsumexp). The Triton kernels then skip
    their first pass.

    None where no such kernel applies (CPU, fp32, a padding mask, dropout, sliding windows,
    softcapping, attention sinks, decoding, head dims they lack); the caller falls back to SDPA.
    """
    length, dim = query.shape[2], query.shape[3]
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and attention_mask is None
            and dropout == 0.0 and getattr(module, "is_causal", True) and kwargs.get("is_causal", True)
            and all(kwargs.get(name) is None for name in _NOT_FUSED_KWARGS)
            and 1 < length == key.shape[2] and dim % 8 == 0 and dim <= 256 and value.shape[-1] == dim
            and _capability(query.device) >= (8, 0)):
        return None
    enabled = {"cudnn": torch.backends.cuda.cudnn_sdp_enabled, "flash": torch.backends.cuda.flash_sdp_enabled}
    for backend in backends:
        where = (backend, query.device, query.dtype, dim, query.shape[1] != key.shape[1])
        if where in _FAILED or not enabled[backend]():
            continue
        try:
            output, logsumexp = _fused_with_logsumexp(backend, query, key, value, scale)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:              # this build or GPU lacks the kernel for these inputs
            _FAILED.add(where)
            continue
        if logsumexp.dim() == 4 and logsumexp.shape[-1] == 1:
            logsumexp = logsumexp.squeeze(-1)
        if logsumexp.shape != query.shape[:3] or output.shape != query.shape:
            _FAILED.add(where)
            continue
        return output.transpose(1, 2).contiguous(), logsumexp
    return None


class NotRoutable(AttnprofError):
    """The model's attention cannot run through the "attnprof" function; `capture` then reads
    eager attention weights instead."""


# Attention arguments SDPA would reject (softcap) or silently drop (sinks), so the "attnprof"
# function cannot stand in for the model's attention when they are set.
_UNROUTABLE_KWARGS = {"softcap": "attention logit softcapping", "s_aux": "attention sinks",
                      "sinks": "attention sinks"}


def _attnprof_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """The registered attention function: record statistics, then run the model's SDPA attention
    (or, on a GPU, a fused attention whose normalisers the kernels reuse)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    unroutable = sorted({what for name, what in _UNROUTABLE_KWARGS.items() if kwargs.get(name) is not None})
    if unroutable:
        raise NotRoutable(f"{type(module).__name__} uses {' and '.join(unroutable)}")
    if _ACTIVE:
        recorder = _ACTIVE[-1]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        sliding_window = kwargs.get("sliding_window")
        fused = None
        if recorder.wants_logsumexp(query, key, attention_mask, sliding_window):
            fused = attention_with_logsumexp(module, query, key, value, attention_mask, dropout, scale, kwargs)
        recorder.record(module, query, key, attention_mask, scale, sliding_window,
                        logsumexp=None if fused is None else fused[1])
        if fused is not None:
            return fused[0], None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def register() -> str:
    """Register the "attnprof" attention (and its SDPA-style mask) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(ATTN_NAME, _attnprof_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    _ACTIVE.append(recorder)
    try:
        yield recorder
        recorder.flush()        # the forward pass is over: its last layers leave their batch
    finally:
        _ACTIVE.remove(recorder)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost modules whose class name ends in "Attention", in model order."""
    found = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    return [m for n, m in found if not any(o != n and n.startswith(o + ".") for o, _ in found)]


@contextlib.contextmanager
def eager_hooks(model: torch.nn.Module, recorder: Recorder) -> Iterator[Recorder]:
    """Fallback: forward hooks on eager attention modules reduce the weights they return."""
    def hook(module, args, kwargs, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise AttnprofError(f"{type(module).__name__} returned no attention weights: load the "
                                "model with attn_implementation='eager'")
        length, window = weights.shape[-1], recorder.window
        visible = _visible_tail(kwargs.get("attention_mask"), length, window, weights.device)
        probs = weights[:, :, length - window:, :].float()
        recorder.store(recorder.layer_index(module), reduce_tail(probs, visible.sum(dim=-1)))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    if not handles:
        raise AttnprofError(f"{type(model).__name__}: no attention modules found to hook")
    try:
        yield recorder
    finally:
        for h in handles:
            h.remove()


@dataclass
class Capture:
    """Per-probe arrays of one model: A (N, L, H, M), sink/local/entropy (N, L, H); `path`:
    "stream" (attnprof's attention function) or "hooks" (eager weights, the fallback)."""
    A: np.ndarray
    sink: np.ndarray
    local: np.ndarray
    entropy: np.ndarray
    distances: np.ndarray
    path: str = "stream"


def _stack(recorders: list[Recorder], num_layers: int) -> dict[str, np.ndarray]:
    out = {}
    for field in STAT_FIELDS:
        per_probe = []
        for rec in recorders:
            if sorted(rec.layers) != list(range(num_layers)):
                raise AttnprofError(f"captured {len(rec.layers)} of {num_layers} attention layers: "
                                    "this architecture routes attention in a way attnprof cannot see")
            per_probe.append(torch.stack([getattr(rec.layers[i], field) for i in range(num_layers)], dim=1))
        out[field] = torch.cat(per_probe, dim=0).numpy()
    return out


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the token ids must go: the device the input embedding runs on.

    With a device map, accelerate may keep that layer's weights elsewhere (offloaded: the
    parameter sits on the meta device) and run it on its hook's execution device."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution) if not isinstance(execution, int) else torch.device("cuda", execution)
    device = embedding.weight.device
    return torch.device("cpu") if device.type == "meta" else device


def capture(model: torch.nn.Module, input_ids: np.ndarray, *, window: int, estimator: str = "tail",
            path: str = "stream", progress: Callable[[int], None] | None = None) -> Capture:
    """Run every probe (one forward pass each) and return the per-probe statistics.

    path="stream" needs the model loaded with attn_implementation="attnprof" (see register());
    path="hooks" needs attn_implementation="eager".
    """
    if estimator not in ("tail", "dense"):
        raise AttnprofError(f"estimator {estimator!r} is not a streaming estimator")
    check_window(window, input_ids.shape[1])
    limit_heap_growth()
    num_layers = model.config.get_text_config().num_hidden_layers
    device = input_device(model)

    def run(path: str) -> list[Recorder]:
        recorders = []
        for n in range(len(input_ids)):
            ids = torch.as_tensor(input_ids[n : n + 1], device=device)
            recorders.append(_record_forward(model, ids, Recorder(estimator, window), path))
            if progress:
                progress(1)
        return recorders

    recorders, path = _with_fallback(model, path, estimator, run)
    arrays = _stack(recorders, num_layers)
    return Capture(distances=np.arange(arrays["A"].shape[-1]), path=path, **arrays)


def _record_forward(model: torch.nn.Module, ids: torch.Tensor, rec: Recorder, path: str) -> Recorder:
    """One forward pass with `rec` recording every attention layer, through `path`."""
    ctx = recording(rec) if path == "stream" else eager_hooks(model, rec)
    with ctx, torch.inference_mode():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    if path == "stream" and not rec.layers:
        raise NotRoutable(f"{type(model).__name__} computes its attention without transformers' attention "
                          "functions")
    return rec.finish()


def _with_fallback(model: torch.nn.Module, path: str, estimator: str, run: Callable[[str], RunOutput]
                   ) -> tuple[RunOutput, str]:
    """(`run(path)`, path); where the model's attention cannot go through the "attnprof" function
    (softcapping, attention sinks, attention computed in place such as ALiBi's), switch the model to
    eager attention and run again through hooks on it, which read the weights it returns."""
    try:
        return run(path), path
    except NotRoutable as exc:
        if path != "stream":
            raise
        if estimator == "dense":
            raise AttnprofError(f"{exc}: the dense estimator needs attnprof's attention function, "
                                "which cannot stand in for it; use --estimator tail") from None
        warnings.warn(f"{exc}: attnprof's attention function cannot stand in for that, so the "
                      "capture reads eager attention weights (memory grows as T² per layer)")
        model.set_attn_implementation("eager")
        if model.config._attn_implementation != "eager":       # transformers only logs a refusal
            raise AttnprofError(f"{exc}, and {type(model).__name__} cannot switch to eager attention once "
                                "loaded: load it with attn_implementation='eager'") from None
        return run("hooks"), "hooks"


TAF_DISTANCES = (10, 20, 30, 50, 100, 200, 500, 1000, 2000)
TAF_PREFIX = 50          # the protocol's sequence length is d + 50
TAF_FIT_D_MIN = 30


def taf_fit_distances(distances: np.ndarray) -> np.ndarray:
    """The protocol's distances that enter its power-law fit (d ≥ 30)."""
    return distances[distances >= TAF_FIT_D_MIN]


def capture_taf(model: torch.nn.Module, input_ids: np.ndarray, *,
                distances: tuple[int, ...] = TAF_DISTANCES,
                progress: Callable[[int], None] | None = None) -> Capture:
    """The TAF diagnose protocol: for each distance d, a prompt of d+50 tokens, the last query's
    attention to the key d back, one forward pass per (prompt, distance). Kept for comparison with
    published TAF numbers; it costs one forward pass per distance."""
    length = input_ids.shape[1]
    usable = [d for d in distances if d + TAF_PREFIX <= length]
    if len([d for d in usable if d >= TAF_FIT_D_MIN]) < 2:
        raise AttnprofError(f"the TAF protocol needs probes of at least {TAF_FIT_D_MIN + 20 + TAF_PREFIX} "
                            f"tokens (got {length})")
    limit_heap_growth()
    num_layers = model.config.get_text_config().num_hidden_layers
    device = input_device(model)

    def run(path: str) -> dict[str, list[np.ndarray]]:
        per_probe = {f: [] for f in STAT_FIELDS}
        for row in input_ids:
            columns, last = [], None
            for d in usable:
                ids = torch.as_tensor(row[None, : d + TAF_PREFIX], device=device)
                last = _stack([_record_forward(model, ids, Recorder("tail", window=1), path)], num_layers)
                columns.append(last["A"][..., d])
                if progress:
                    progress(1)
            per_probe["A"].append(np.stack(columns, axis=-1))
            for f in STAT_FIELDS[1:]:          # from the longest prompt
                per_probe[f].append(last[f])
        return per_probe

    per_probe, path = _with_fallback(model, "stream", "taf", run)
    return Capture(distances=np.asarray(usable), path=path, **{f: np.concatenate(v) for f, v in per_probe.items()})
