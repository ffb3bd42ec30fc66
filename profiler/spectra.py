"""Spectra of weight changes: pure math on tensors, no I/O.

ΔW = W_merged − W_base of a LoRA merge is low rank plus full-rank rounding noise (each stored
weight is the true value rounded to its float format). The functions here measure ΔW's
singular values (exact for small matrices, randomized otherwise), summarise them (rank for
90% of the energy, stable rank), bound the rounding noise's largest singular value from the
known rounding model, count the singular values above that floor (the signal rank), and give
the exact spectrum of a LoRA delta scale·B·A from its factors.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .rules import NOISE_FLOOR_MARGIN, RANK_ENERGY

# Float formats: (explicit mantissa bits, exponent of the smallest normal number).
FLOAT_FORMATS: dict[torch.dtype, tuple[int, int]] = {
    torch.float64: (52, -1022),
    torch.float32: (23, -126),
    torch.bfloat16: (7, -126),
    torch.float16: (10, -14),
    torch.float8_e4m3fn: (3, -6),
    torch.float8_e5m2: (2, -14),
}

EXACT_SVD_MAX_DIM = 1023          # min(m, n) up to this: full SVD in float64 ...
EXACT_SVD_MAX_ELEMENTS = 1 << 22  # ... when the matrix also has at most this many elements
OVERSAMPLE = 16                   # randomized SVD: extra random directions beyond k
POWER_ITERATIONS = 4              # randomized SVD: subspace iterations (sharpen the top of the spectrum)


def precision_rank(dtype: torch.dtype) -> int:
    """Mantissa bits of a float format (larger = finer); used to order formats by precision."""
    return FLOAT_FORMATS[dtype][0]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of the float format `dtype` at |x|: the size of one rounding step there.

    The power of two 2**floor(log2|x|) is read from x's exponent bits (float32, or float64 for
    float64 input), floored at the format's smallest normal number (subnormals and zero share
    its spacing), then shifted down by the format's mantissa bits.
    """
    mantissa_bits, min_exponent = FLOAT_FORMATS[dtype]
    if x.dtype == torch.float64:
        binade = (x.view(torch.int64) & 0x7FF0000000000000).view(torch.float64)
    else:
        binade = (x.float().view(torch.int32) & 0x7F800000).view(torch.float32)
    smallest = 2.0 ** min_exponent
    if smallest < torch.finfo(binade.dtype).tiny:          # float64's range in a float32 tensor
        binade = binade.double()
    return binade.clamp_(min=smallest).mul_(2.0 ** -mantissa_bits)


def rounding_variance(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Variance ulp²/12 of the error made by rounding values of magnitude |x| to `dtype`.

    Round-to-nearest leaves an error uniform in ±ulp/2 for values that are not special
    (continuous-valued weights), hence ulp²/12.
    """
    return ulp(x, dtype).square_().div_(12.0)


def effective_dtype(x: torch.Tensor) -> torch.dtype:
    """The coarsest float format in which every value of `x` is exact.

    A float32 tensor that was rounded to bfloat16 (or float16) at some point and upcast again
    still carries that coarser rounding noise; this finds it.
    """
    dtype = x.dtype
    if dtype not in FLOAT_FORMATS:
        return dtype
    candidates = [d for d in (torch.bfloat16, torch.float16)
                  if precision_rank(d) < precision_rank(dtype)]
    for candidate in candidates:
        if _exact_in(x, candidate):
            return candidate
    return dtype


def _exact_in(x: torch.Tensor, dtype: torch.dtype, chunk: int = 1 << 20) -> bool:
    flat = x.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        if not torch.equal(part.to(dtype).to(part.dtype), part):
            return False
    return True


def noise_floor(row_variance: torch.Tensor | np.ndarray, col_variance: torch.Tensor | np.ndarray,
                *, margin: float = NOISE_FLOOR_MARGIN) -> float:
    """Upper bound on the largest singular value of independent zero-mean noise.

    `row_variance[i]` is the sum of the noise variances along row i, `col_variance[j]` along
    column j. For such a matrix the spectral norm concentrates below
    max_i sqrt(row_variance[i]) + max_j sqrt(col_variance[j]) (Latała; Bandeira & van Handel
    2016); with equal variances this is the Marchenko–Pastur edge σ(√m + √n). Unlike the
    edge computed from the average variance it stays an upper bound when a few rows or
    columns hold much larger weights (and so larger rounding steps). `margin` covers the
    finite-size fluctuation around the edge.
    """
    rows = torch.as_tensor(row_variance, dtype=torch.float64)
    cols = torch.as_tensor(col_variance, dtype=torch.float64)
    if rows.numel() == 0 or cols.numel() == 0:
        return 0.0
    return float(margin * (rows.max().clamp(min=0).sqrt() + cols.max().clamp(min=0).sqrt()))


def numerical_floor(sigma_max: float, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> float:
    """Singular values below sigma_max·max(m, n)·eps are arithmetic error, not structure.

    The usual numerical-rank tolerance (as in numpy.linalg.matrix_rank), with eps of the
    arithmetic that formed ΔW and its spectrum (float32 unless ΔW is float64).
    """
    return float(sigma_max) * max(shape) * torch.finfo(dtype).eps


def signal_rank(s: Sequence[float] | np.ndarray, floor: float) -> int:
    """Number of singular values strictly above the noise floor."""
    return int(np.count_nonzero(np.asarray(s, dtype=np.float64) > floor))


def rank_for_energy(s: Sequence[float] | np.ndarray, total_energy: float,
                    frac: float = RANK_ENERGY) -> int | None:
    """Smallest k whose top-k singular values hold `frac` of total_energy = ‖ΔW‖_F².

    This is the rank Biderman et al. (2024) use to compare LoRA with full fine-tuning.
    Returns 0 for a zero matrix and None when the given (top) singular values do not reach
    the fraction, i.e. the rank is larger than len(s).
    """
    if total_energy <= 0:
        return 0
    cumulative = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    # a relative slack keeps an exact-rank matrix from missing its own rank by rounding
    reached = np.nonzero(cumulative >= frac * total_energy * (1 - 1e-12))[0]
    return int(reached[0]) + 1 if reached.size else None


def stable_rank(s: Sequence[float] | np.ndarray, total_energy: float) -> float:
    """‖ΔW‖_F² / σ_1²: a continuous, noise-robust-ish count of the significant directions."""
    s = np.asarray(s, dtype=np.float64)
    if s.size == 0 or s[0] <= 0:
        return 0.0
    return float(total_energy / s[0] ** 2)


def singular_values(m: torch.Tensor, k: int, *, seed: int = 0) -> tuple[np.ndarray, bool]:
    """The singular values of a 2-D matrix, descending, as float64.

    Small matrices (see EXACT_SVD_MAX_DIM / EXACT_SVD_MAX_ELEMENTS) get an exact SVD in
    float64 and all their singular values come back (second item True). Larger ones get a
    randomized range finder with oversampling and power iterations (Halko, Martinsson &
    Tropp 2011) in the matrix's own precision, and only the top k come back (second item
    False). The random test matrix comes from `seed`, so results are reproducible.
    """
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(m.shape)}")
    rows, cols = m.shape
    if min(rows, cols) == 0:
        return np.zeros(0), True
    if min(rows, cols) <= EXACT_SVD_MAX_DIM and rows * cols <= EXACT_SVD_MAX_ELEMENTS:
        return torch.linalg.svdvals(m.to(torch.float64)).numpy(), True
    return _randomized_svdvals(m, k, seed), False


def top_singular_values(m: torch.Tensor, k: int, *, seed: int = 0) -> np.ndarray:
    """The k largest singular values of m (fewer when min(m.shape) < k), descending."""
    s, _ = singular_values(m, k, seed=seed)
    return s[:k]


def _randomized_svdvals(m: torch.Tensor, k: int, seed: int) -> np.ndarray:
    a = m if m.shape[0] >= m.shape[1] else m.T       # work on the tall orientation (a view)
    n = a.shape[1]
    k = min(k, n)
    width = min(k + OVERSAMPLE, n)
    dtype = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
    a = a.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, width, generator=generator, dtype=dtype)
    q = _orthonormal(a @ omega)
    for _ in range(POWER_ITERATIONS):
        q = _orthonormal(a @ _orthonormal(a.T @ q))
    # singular values of the width×n projection Qᵀa = those of the R factor of its transpose
    r = torch.linalg.qr((a.T @ q).to(torch.float64), mode="r")[1]
    return torch.linalg.svdvals(r).numpy()[:k]


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of y's columns (thin QR in float64: stable and fast for thin y)."""
    return torch.linalg.qr(y.to(torch.float64))[0].to(y.dtype)


def lowrank_spectrum(B: torch.Tensor | np.ndarray, A: torch.Tensor | np.ndarray,
                     scale: float = 1.0) -> np.ndarray:
    """Exact singular values of scale·B·A for B (d×r) and A (r×k), in O((d+k)·r²).

    With B = Q_b R_b and Aᵀ = Q_a R_a (thin QR), B·A = Q_b (R_b R_aᵀ) Q_aᵀ, and the outer
    factors have orthonormal columns, so the singular values are those of the r×r core.
    """
    B = torch.as_tensor(B).to(torch.float64)
    A = torch.as_tensor(A).to(torch.float64)
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"factors do not chain: B {tuple(B.shape)}, A {tuple(A.shape)}")
    _, r_b = torch.linalg.qr(B)
    _, r_a = torch.linalg.qr(A.T)
    return abs(float(scale)) * torch.linalg.svdvals(r_b @ r_a.T).numpy()


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """LoRA's merge scale: alpha/r (Hu et al. 2021), or alpha/√r with rsLoRA (Kalajdzievski 2023)."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)
