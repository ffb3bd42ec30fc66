"""The fit on hand-built profiles whose gamma is known."""
from __future__ import annotations

import numpy as np
import pytest

from profiler import fit, rules
from profiler.capture import Capture
from profiler.profiles import FitSetup, build_profile

T, W = 2048, 256


def power_profiles(gammas, num_probes=12, noise=0.05, seed=0, length=T - W + 1):
    """Per-probe A(d) = d^-gamma with multiplicative log-normal noise (one head per gamma)."""
    rng = np.random.default_rng(seed)
    d = np.maximum(np.arange(length), 1.0)
    clean = np.stack([d ** -g for g in gammas])                    # (heads, M)
    noisy = clean[None] * np.exp(noise * rng.standard_normal((num_probes,) + clean.shape))
    return noisy[:, None]                                         # (N, L=1, H, M)


def make_profile(A, sink=None, local=None, seed=0):
    n, layers, heads, _ = A.shape
    zeros = np.zeros((n, layers, heads))
    curves = Capture(A=A, sink=zeros if sink is None else sink, local=zeros if local is None else local,
                     entropy=zeros + 0.5, distances=np.arange(A.shape[-1]))
    model = {"name": "hand-built", "num_layers": layers, "num_heads": heads, "rope_theta": None}
    probes = {"suite": "synthetic", "length": T, "num": n, "seed": seed, "window": W}
    return build_profile(curves, np.zeros((n, T), dtype=np.int64), model, probes,
                         FitSetup.make(T - W - rules.FIT_SINK_MARGIN, n, seed))


def test_noise_free_power_laws_are_exact():
    truth = [0.3, 0.8, 1.0, 1.5]
    prof = make_profile(power_profiles(truth, noise=0.0))
    assert np.allclose([h.gamma for h in prof.heads], truth, atol=1e-3)
    assert all(h.r2 > 0.9999 for h in prof.heads)


@pytest.mark.parametrize("noise", [0.05, 0.15])
def test_known_gammas_are_recovered_with_covering_ci(noise):
    truth = [0.3, 0.8, 1.0, 1.5]
    prof = make_profile(power_profiles(truth, noise=noise, seed=3))
    for h, g in zip(prof.heads, truth):
        assert abs(h.gamma - g) <= 0.02, (g, h.gamma)
        assert h.gamma_ci[0] <= g <= h.gamma_ci[1], (g, h.gamma_ci)
        assert h.r2 > 0.95
    assert [h.regime for h in prof.heads] == ["long-range", "long-range", "critical", "short-range"]


def test_ci_coverage_over_repeated_noise_draws():
    """Across independent noise draws the 95% CI covers the truth most of the time."""
    covered = 0
    for seed in range(20):
        prof = make_profile(power_profiles([0.8], noise=0.3, num_probes=16, seed=seed), seed=seed)
        lo, hi = prof.heads[0].gamma_ci
        covered += lo <= 0.8 <= hi
    assert covered >= 16


def test_uniform_attention_is_flat():
    A = np.full((4, 1, 1, T - W + 1), 1.0 / T)
    prof = make_profile(A)
    assert abs(prof.heads[0].gamma) <= 0.05
    assert prof.heads[0].regime == "flat"


def test_sink_and_local_heads_are_labelled_before_the_fit():
    M = T - W + 1
    sink_only = np.zeros((3, 1, 2, M))
    sink_only[..., 1, 1] = 1.0                         # head 1: everything on d = 1
    sink = np.zeros((3, 1, 2)); sink[..., 0] = 1.0     # head 0: everything on key 0
    local = np.zeros((3, 1, 2)); local[..., 1] = 1.0
    prof = make_profile(sink_only, sink=sink, local=local)
    assert [h.regime for h in prof.heads] == ["sink", "local"]
    assert all(np.isfinite(h.gamma) for h in prof.heads)


def test_irregular_needs_poor_r2_and_real_scatter():
    rng = np.random.default_rng(0)
    A = np.exp(rng.standard_normal((6, 1, 1, T - W + 1)))   # no power law, large scatter
    binned_shuffle = make_profile(A)
    assert binned_shuffle.heads[0].regime in ("irregular", "flat")
    zigzag = np.ones((6, 1, 1, T - W + 1)) * (1 + 0.9 * np.sign(np.sin(np.arange(T - W + 1) / 40.0)))
    prof = make_profile(zigzag + 0.01)
    assert prof.heads[0].r2 < rules.IRREGULAR_R2_MAX
    assert prof.heads[0].regime == "irregular"


def test_regime_rules_table_order():
    assert rules.regime_label(0.5, 0.9, 0.0, 0.6, 0.6) == "sink"
    assert rules.regime_label(0.5, 0.9, 0.0, 0.1, 0.6) == "local"
    assert rules.regime_label(0.5, 0.3, 0.5, 0.1, 0.1) == "irregular"
    assert rules.regime_label(0.1, 0.3, 0.01, 0.1, 0.1) == "flat"
    assert rules.regime_label(0.2, 0.9, 0.0, 0.1, 0.1) == "long-range"
    assert rules.regime_label(0.95, 0.9, 0.0, 0.1, 0.1) == "critical"
    assert rules.regime_label(1.05, 0.9, 0.0, 0.1, 0.1) == "critical"
    assert rules.regime_label(1.06, 0.9, 0.0, 0.1, 0.1) == "short-range"
    assert [r.label for r in rules.REGIME_RULES] == list(rules.REGIMES)


def test_log_bins_cover_the_range_without_gaps():
    bins = fit.log_bins(16, 1792)
    assert bins.lo[0] == 16 and bins.hi[-1] == 1793
    assert np.all(bins.lo[1:] == bins.hi[:-1])
    assert np.all(bins.hi > bins.lo)


def test_gamma_pade_closed_form():
    # (2θ − T√2)/(2θ + T√2) for θ = 1e5, T = 2048
    s = 2048 * np.sqrt(2)
    assert fit.gamma_pade(1e5, 2048) == pytest.approx((2e5 - s) / (2e5 + s))
    pred, flag, rel = fit.pade_check(0.5, 1e5, 2048)
    assert flag is True and rel == pytest.approx(abs(0.5 - pred) / pred)
    assert fit.pade_check(0.5, None, 2048) == (None, None, None)


def test_model_level_gamma_is_the_fit_of_the_mean_profile():
    """Model-level γ fits the heads' mean profile, not the mean of their γ: for heads d^-0.3 and
    d^-1.5 the mean's local slope −d ln Ā / d ln d = (0.3 d^-0.3 + 1.5 d^-1.5) / (d^-0.3 + d^-1.5)
    falls from 0.342 at d = 16 to 0.300 at the far end of the fit, so γ must lie between them
    (the mean of the heads' γ would be 0.9)."""
    prof = make_profile(power_profiles([0.3, 1.5], noise=0.0))
    d = np.array([rules.FIT_D_MIN, T - W - rules.FIT_SINK_MARGIN], dtype=float)
    slope = (0.3 * d ** -0.3 + 1.5 * d ** -1.5) / (d ** -0.3 + d ** -1.5)
    assert slope[1] < prof.model_level.gamma < slope[0]
    noisy = make_profile(power_profiles([0.3, 1.5], noise=0.1, seed=2))
    lo, hi = noisy.model_level.gamma_ci
    assert lo < prof.model_level.gamma < hi and hi - lo < 0.05


def test_exponential_alternative_wins_on_exponential_decay():
    d = np.arange(T - W + 1)
    A = np.exp(-d / 300.0)[None, None, None].repeat(4, 0)
    prof = make_profile(A)
    assert prof.heads[0].exp_r2 > 0.99 > prof.heads[0].r2


def test_heads_index_like_a_layer_by_head_array():
    """p[layer, head] with Python's rules: negative indices from the end, each axis checked."""
    A = np.concatenate([power_profiles([0.3, 0.8, 1.0], noise=0.0)] * 2, axis=1)   # (N, 2 layers, 3 heads, M)
    prof = make_profile(A)
    assert (prof[1, 2].layer, prof[1, 2].head) == (1, 2)
    assert (prof[-1, -1].layer, prof[-1, -1].head) == (1, 2) and (prof[0, -3].layer, prof[0, -3].head) == (0, 0)
    with pytest.raises(IndexError, match="head 3 out of range for 3 heads"):
        prof[0, 3]
    with pytest.raises(IndexError, match="layer -3 out of range"):
        prof[-3, 0]
    with pytest.raises(TypeError, match=r"index with \[layer, head\]"):
        prof[3]


def test_nan_survives_the_json_round_trip_and_the_views_show_the_intervals(tmp_path):
    """JSON has no NaN (it is written as null); a stored profile must read it back as NaN, so
    that arithmetic and the Jupyter views work on it as on the live object."""
    from profiler import load_profile
    prof = make_profile(power_profiles([0.3, 0.8], noise=0.0))
    prof.heads[1].gamma, prof.heads[1].gamma_ci = float("nan"), (float("nan"), 0.9)
    prof.save(tmp_path)
    loaded = load_profile(tmp_path)
    assert np.isnan(loaded[0, 1].gamma) and np.isnan(loaded[0, 1].gamma_ci[0]) and loaded[0, 1].gamma_ci[1] == 0.9
    assert loaded.to_dict() == prof.to_dict()
    assert loaded.model_level.gamma_pade is None                   # "does not apply" stays None
    head = loaded[0, 0].summary()
    assert head["gamma_lo"] <= head["gamma"] <= head["gamma_hi"]
    assert "gamma_lo" in loaded[0, 0]._repr_html_()
