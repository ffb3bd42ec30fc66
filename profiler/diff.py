"""Diff: base vs merged profiles on identical probes — paired CIs, shifted heads, the verdict.

Per head: delta gamma = gamma_merged − gamma_base with a *paired* percentile bootstrap (the same
resampled probes refitted for both models), shifted when that CI excludes 0 and |delta| is at
least SHIFT_MIN_ABS_DGAMMA; the Jensen–Shannon divergence of the two normalised profiles; delta
sink mass; regime transitions. Model level: delta gamma with its paired CI. The verdict applies
the gate thresholds of rules.GateThresholds. Pure functions on Profiles: no model, no files.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import fit, rules
from .errors import AttnprofError
from .profiles import FitSetup, Profile
from .results import Result, head_index


@dataclass
class HeadDiff(Result):
    layer: int
    head: int
    gamma_base: float
    gamma_merged: float
    dgamma: float
    dgamma_ci: tuple[float, float]
    js: float
    dsink: float
    shifted: bool
    regime_base: str
    regime_merged: str


@dataclass
class Verdict(Result):
    """The gate's decision and the numbers that decided it."""
    verdict: str                       # "pass" | "regression"
    reasons: list[str]
    thresholds: dict[str, float]

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


@dataclass
class ProfileDiff(Result):
    """Everything diff.json holds. Index it with [layer, head] for a HeadDiff."""
    verdict: str
    thresholds: dict[str, float]
    reasons: list[str]
    model_dgamma: float
    model_dgamma_ci: tuple[float, float]
    shifted_heads: int
    shifted_fraction: float
    shifted_heads_range: tuple[int, int]  # shifted beyond doubt … possibly shifted, within the CIs
    borderline: bool                      # within the CIs the verdict could go either way
    regime_flips: int
    regime_flip_fraction: float
    js_mean: float
    transitions: dict[str, Any]
    heads: list[HeadDiff]
    weights: list[dict[str, Any]] | None = None          # one entry per tensor (see weights.TensorDiff)
    weights_summary: dict[str, Any] | None = None         # counts and lists of the weight diff
    adapter: dict[str, Any] | None = None
    flags: list[dict[str, str]] = field(default_factory=list)
    probes_fingerprint: str = ""

    def __getitem__(self, key: tuple[int, int]) -> HeadDiff:
        num_layers = max(h.layer for h in self.heads) + 1
        return self.heads[head_index(key, num_layers, len(self.heads) // num_layers)]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for h in self.heads:
            row = h.to_dict()
            row["dgamma_lo"], row["dgamma_hi"] = row.pop("dgamma_ci")
            out.append(row)
        return out

    def summary(self) -> dict[str, Any]:
        lo, hi = self.model_dgamma_ci
        return {"verdict": self.verdict, "model Δgamma": f"{self.model_dgamma:+.4f} [{lo:+.4f}, {hi:+.4f}]",
                "shifted heads": f"{self.shifted_heads} ({self.shifted_fraction:.1%}); "
                                 f"{self.shifted_heads_range[0]}–{self.shifted_heads_range[1]} within the CIs",
                "borderline": self.borderline,
                "regime flips": f"{self.regime_flips} ({self.regime_flip_fraction:.1%})",
                "mean JS": f"{self.js_mean:.2e}", "reasons": "; ".join(self.reasons)}

    @property
    def verdict_result(self) -> Verdict:
        return Verdict(self.verdict, self.reasons, self.thresholds)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence (bits, in [0, 1]) between distributions along the last axis."""
    p = p / p.sum(axis=-1, keepdims=True)
    q = q / q.sum(axis=-1, keepdims=True)
    m = 0.5 * (p + q)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / b), 0.0).sum(axis=-1)
    return np.clip(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0, 1.0)


def gate(model_dgamma: float, shifted_fraction: float, flip_fraction: float,
         thresholds: rules.GateThresholds) -> Verdict:
    """Apply the three gate thresholds; any exceeded is a regression."""
    reasons = []
    if abs(model_dgamma) > thresholds.max_model_dgamma:
        reasons.append(f"|model Δgamma| {abs(model_dgamma):.4f} > {thresholds.max_model_dgamma}")
    if shifted_fraction > thresholds.max_shifted_heads:
        reasons.append(f"shifted heads {shifted_fraction:.1%} > {thresholds.max_shifted_heads:.0%}")
    if flip_fraction > thresholds.max_regime_flips:
        reasons.append(f"regime flips {flip_fraction:.1%} > {thresholds.max_regime_flips:.0%}")
    verdict = "regression" if reasons else "pass"
    return Verdict(verdict, reasons or ["all within thresholds"], asdict(thresholds))


def verdict_uncertainty(heads: list[HeadDiff], model_dgamma_ci: tuple[float, float], flip_fraction: float,
                        thresholds: rules.GateThresholds) -> tuple[tuple[int, int], bool]:
    """How far the verdict rests on point estimates: the count of shifted heads read from the
    ends of their paired CIs (shifted beyond doubt: the whole CI past ±SHIFT_MIN_ABS_DGAMMA;
    possibly shifted: the CI excludes 0 and reaches that far), and whether the gate would decide
    differently at the low and the high ends (those counts, and the model |Δγ| CI's ends)."""
    cut = rules.SHIFT_MIN_ABS_DGAMMA
    sure = sum(h.shifted and (h.dgamma_ci[0] >= cut or h.dgamma_ci[1] <= -cut) for h in heads)
    possible = sum(h.shifted or ((h.dgamma_ci[0] > 0 or h.dgamma_ci[1] < 0) and max(map(abs, h.dgamma_ci)) >= cut)
                   for h in heads)
    lo, hi = model_dgamma_ci
    far = max(abs(lo), abs(hi))
    near = 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))
    total = max(1, len(heads))
    low = gate(near, sure / total, flip_fraction, thresholds).verdict
    high = gate(far, possible / total, flip_fraction, thresholds).verdict
    return (sure, possible), low != high


def check_comparable(base: Profile, merged: Profile) -> None:
    """Refuse to diff profiles of different shapes or different probes."""
    keys = ("num_layers", "num_heads", "num_kv_heads", "head_dim")
    for k in keys:
        if base.model.get(k) != merged.model.get(k):
            raise AttnprofError(f"base and merged differ in {k} ({base.model.get(k)} vs {merged.model.get(k)})")
    for k in ("length", "num", "suite", "seed", "estimator", "window"):
        if base.probes.get(k) != merged.probes.get(k):
            raise AttnprofError(f"base and merged were profiled with different probe {k} "
                                f"({base.probes.get(k)} vs {merged.probes.get(k)})")
    if base.input_ids.shape != merged.input_ids.shape or not np.array_equal(base.input_ids, merged.input_ids):
        raise AttnprofError("base and merged were profiled on different probe token ids")


def diff_profiles(base: Profile, merged: Profile, thresholds: rules.GateThresholds | None = None,
                  seed: int | None = None) -> ProfileDiff:
    """Paired comparison of two profiles of the same probes."""
    check_comparable(base, merged)
    thresholds = thresholds or rules.GateThresholds()
    seed = base.probes["seed"] if seed is None else seed
    num = base.curves.A.shape[0]
    if base.probes.get("estimator") == "taf":
        keep = base.curves.distances >= base.fit["d_min"]
        setup = FitSetup.points(base.curves.distances[keep], num, seed)
    else:
        setup = FitSetup.make(int(base.fit["d_max"]), num, seed, d_min=int(base.fit["d_min"]))
    binned = [fit.bin_profile(p.curves.A, setup.bins, p.curves.distances) for p in (base, merged)]

    head_boot = [fit.bootstrap_gamma(b, setup.bins, setup.resample) for b in binned]
    dgamma_ci = fit.percentile_ci(head_boot[1] - head_boot[0])            # (L, H, 2)
    model_boot = [fit.bootstrap_gamma(b.mean(axis=(1, 2)), setup.bins, setup.resample) for b in binned]
    model_dgamma = merged.model_level.gamma - base.model_level.gamma
    model_ci = fit.percentile_ci(model_boot[1] - model_boot[0])

    js = js_divergence(np.maximum(base.curves.A.mean(axis=0), 0), np.maximum(merged.curves.A.mean(axis=0), 0))
    heads: list[HeadDiff] = []
    for hb, hm in zip(base.heads, merged.heads):
        d = hm.gamma - hb.gamma
        lo, hi = dgamma_ci[hb.layer, hb.head]
        shifted = bool((lo > 0 or hi < 0) and abs(d) >= rules.SHIFT_MIN_ABS_DGAMMA)
        heads.append(HeadDiff(hb.layer, hb.head, hb.gamma, hm.gamma, d, (lo, hi), js[hb.layer, hb.head],
                              hm.sink_mass - hb.sink_mass, shifted, hb.regime, hm.regime))

    labels = list(rules.REGIMES)
    counts = np.zeros((len(labels), len(labels)), dtype=int)
    for h in heads:
        counts[labels.index(h.regime_base), labels.index(h.regime_merged)] += 1
    total = len(heads)
    shifted = sum(h.shifted for h in heads)
    flips = sum(h.regime_base != h.regime_merged for h in heads)
    verdict = gate(model_dgamma, shifted / total, flips / total, thresholds)
    shifted_range, borderline = verdict_uncertainty(heads, tuple(model_ci), flips / total, thresholds)
    return ProfileDiff(
        verdict=verdict.verdict, thresholds=verdict.thresholds, reasons=verdict.reasons,
        model_dgamma=model_dgamma, model_dgamma_ci=tuple(model_ci), shifted_heads=shifted,
        shifted_fraction=shifted / total, shifted_heads_range=shifted_range, borderline=borderline,
        regime_flips=flips, regime_flip_fraction=flips / total,
        js_mean=float(js.mean()), transitions={"labels": labels, "counts": counts.tolist()}, heads=heads,
        probes_fingerprint=base.probes.get("fingerprint", ""))


def assert_profile_close(base: Profile, merged: Profile, **thresholds: float) -> ProfileDiff:
    """pytest-friendly gate: raise AssertionError listing what moved when the verdict is regression.

    >>> assert_profile_close(base_profile, merged_profile, max_model_dgamma=0.05)  # doctest: +SKIP
    """
    result = diff_profiles(base, merged, rules.GateThresholds(**thresholds))
    if result.verdict != "pass":
        moved = sorted((h for h in result.heads if h.shifted), key=lambda h: -abs(h.dgamma))[:5]
        top = ", ".join(f"L{h.layer}H{h.head} Δγ={h.dgamma:+.3f}" for h in moved)
        raise AssertionError(f"attention profile regression: {'; '.join(result.reasons)}"
                             + (f" (most shifted: {top})" if top else ""))
    return result
