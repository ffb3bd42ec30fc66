"""Fit: distance-decay exponents, confidence intervals and regime labels, as pure array functions.

Input is the per-probe distance profile A[n, ..., d] (mean attention a query puts on the key d
positions back). A power law A(d) = exp(c) * d^(-gamma) is fitted by weighted least squares of
ln A on ln d over log-spaced distance bins in [d_min, d_max]; each bin's weight is its width in
ln d, so the fit approximates a continuous least-squares fit in log-log space whatever the
integer rounding of the bin edges. Confidence intervals are percentile bootstraps over probes.
Nothing here touches a model or a file.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import rules


@dataclass(frozen=True)
class Bins:
    """Distance bins: bin k averages the distances lo[k] <= d < hi[k].

    `weights` overrides the default weight (width in ln d), e.g. equal weights for the point
    distances of the TAF protocol."""
    lo: np.ndarray
    hi: np.ndarray
    weights: np.ndarray | None = None

    @property
    def log_center(self) -> np.ndarray:
        """Mean of ln d over the integers in each bin."""
        return np.array([np.log(np.arange(a, b)).mean() for a, b in zip(self.lo, self.hi)])

    @property
    def center(self) -> np.ndarray:
        return np.exp(self.log_center)

    @property
    def weight(self) -> np.ndarray:
        """The WLS weight of each bin: its width in ln d unless given."""
        return np.log(self.hi / self.lo) if self.weights is None else self.weights


def log_bins(d_min: int, d_max: int, per_octave: int = rules.FIT_BINS_PER_OCTAVE) -> Bins:
    """Integer bins covering [d_min, d_max] with edges spaced 2^(1/per_octave) apart."""
    if d_max <= d_min:
        raise ValueError(f"fit range is empty: d_max={d_max} <= d_min={d_min}")
    octaves = np.log2((d_max + 1) / d_min)
    count = max(1, int(np.ceil(octaves * per_octave)))
    edges = np.unique(np.round(d_min * 2.0 ** (np.arange(count + 1) / per_octave)).astype(int))
    edges = edges[edges < d_max + 1]
    edges = np.append(edges, d_max + 1)
    return Bins(lo=edges[:-1].astype(float), hi=edges[1:].astype(float))


def point_bins(distances: np.ndarray) -> Bins:
    """One bin per given distance, equally weighted (an ordinary least-squares fit on points)."""
    d = np.asarray(distances, dtype=float)
    return Bins(lo=d, hi=d + 1, weights=np.ones_like(d))


def bin_profile(A: np.ndarray, bins: Bins, distances: np.ndarray | None = None) -> np.ndarray:
    """Average A[..., d] within each bin (distances default to 0, 1, ..., A.shape[-1]-1)."""
    if distances is None:
        distances = np.arange(A.shape[-1])
    out = np.empty(A.shape[:-1] + (len(bins.lo),), dtype=np.float64)
    for k, (a, b) in enumerate(zip(bins.lo, bins.hi)):
        sel = (distances >= a) & (distances < b)
        out[..., k] = A[..., sel].mean(axis=-1)
    return out


def _wls(y: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares y = a + b x along the last axis: (slope, intercept, R^2, residual RMS)."""
    w = w / w.sum()
    xm = (w * x).sum()
    ym = (y * w).sum(axis=-1, keepdims=True)
    sxx = (w * (x - xm) ** 2).sum()
    slope = ((y - ym) * w * (x - xm)).sum(axis=-1) / sxx
    intercept = ym[..., 0] - slope * xm
    resid = y - (intercept[..., None] + slope[..., None] * x)
    ss_res = (w * resid ** 2).sum(axis=-1)
    ss_tot = (w * (y - ym) ** 2).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), 0.0)
    return slope, intercept, r2, np.sqrt(ss_res)


def power_law(binned: np.ndarray, bins: Bins) -> dict[str, np.ndarray]:
    """Fit ln A = c - gamma ln d on binned profiles (..., nbins); also the exponential alternative."""
    y = np.log(np.maximum(binned, rules.PROFILE_FLOOR))
    slope, intercept, r2, rms = _wls(y, bins.log_center, bins.weight)
    exp_slope, _, exp_r2, _ = _wls(y, bins.center, bins.weight)
    return {"gamma": -slope, "intercept": intercept, "r2": r2, "residual_rms": rms,
            "exp_lambda": -exp_slope, "exp_r2": exp_r2}


def bootstrap_indices(num_probes: int, samples: int, seed: int) -> np.ndarray:
    """Resampling weights (samples, num_probes): how often each probe is drawn, divided by N.

    Shared by the one-model CI and the paired diff CI, which must reuse the same draws."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_probes, size=(samples, num_probes))
    counts = np.zeros((samples, num_probes))
    np.add.at(counts, (np.arange(samples)[:, None], draws), 1.0)
    return counts / num_probes


def bootstrap_gamma(binned_per_probe: np.ndarray, bins: Bins, resample: np.ndarray) -> np.ndarray:
    """Gamma refitted on each bootstrap resample of probes: (samples, ...) from (N, ..., nbins)."""
    means = np.tensordot(resample, binned_per_probe, axes=(1, 0))
    return power_law(means, bins)["gamma"]


def percentile_ci(samples: np.ndarray, level: float = rules.CI_LEVEL) -> np.ndarray:
    """Percentile interval over axis 0: (..., 2)."""
    tail = (1.0 - level) / 2 * 100
    return np.moveaxis(np.percentile(samples, [tail, 100 - tail], axis=0), 0, -1)


def gamma_pade(theta: float, length: int) -> float:
    """Closed-form RoPE decay exponent (Marín 2026): (2θ − T√2) / (2θ + T√2)."""
    s = length * np.sqrt(2.0)
    return float((2 * theta - s) / (2 * theta + s))


def pade_check(gamma_obs: float, theta: float | None, length: int) -> tuple[float | None, bool | None, float | None]:
    """(gamma_pade, flagged as outside the closed form's validity, relative error); Nones without RoPE."""
    if theta is None or not np.isfinite(gamma_obs):
        return None, None, None
    pred = gamma_pade(theta, length)
    rel = abs(gamma_obs - pred) / abs(pred) if pred != 0 else float("inf")
    return pred, bool(rel > rules.PADE_RELATIVE_TOLERANCE), float(rel)


def label_heads(fits: dict[str, np.ndarray], sink: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Regime label per head from the one rules table (arrays of equal shape in, object array out)."""
    out = np.empty(np.shape(sink), dtype=object)
    for idx in np.ndindex(out.shape):
        out[idx] = rules.regime_label(float(fits["gamma"][idx]), float(fits["r2"][idx]),
                                      float(fits["residual_rms"][idx]), float(sink[idx]),
                                      float(local[idx]))
    return out
