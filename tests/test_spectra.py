"""Spectral math of the weight diff, on inputs whose answers are known independently."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from profiler import spectra


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_ulp_of_known_values():
    x = torch.tensor([1.0, 3.0, 0.0, -0.75])
    assert spectra.ulp(x, torch.bfloat16).tolist() == [2.0 ** -7, 2.0 ** -6, 2.0 ** -133, 2.0 ** -8]
    assert spectra.ulp(x, torch.float16).tolist() == [2.0 ** -10, 2.0 ** -9, 2.0 ** -24, 2.0 ** -11]
    assert spectra.ulp(x[:2], torch.float32).tolist() == [2.0 ** -23, 2.0 ** -22]


def test_ulp_matches_torch_nextafter():
    x = torch.randn(1000, generator=_gen(0)).abs() * 10 + 1e-3
    for dtype in (torch.bfloat16, torch.float16):
        stored = x.to(dtype)
        up = torch.nextafter(stored.float().to(dtype), torch.tensor(float("inf"), dtype=dtype)).float()
        torch.testing.assert_close(spectra.ulp(stored.float(), dtype), up - stored.float())


def test_effective_dtype_finds_the_coarsest_exact_format():
    x = torch.randn(64, 64, generator=_gen(1))
    assert spectra.effective_dtype(x) == torch.float32
    assert spectra.effective_dtype(x.to(torch.bfloat16).float()) == torch.bfloat16
    assert spectra.effective_dtype(x.to(torch.float16).float()) == torch.float16
    assert spectra.effective_dtype(x.to(torch.bfloat16)) == torch.bfloat16


def test_rounding_variance_matches_actual_bf16_rounding_errors():
    w = torch.randn(512, 512, generator=_gen(2)) * 0.02
    err = w.to(torch.bfloat16).float() - w
    predicted = spectra.rounding_variance(w, torch.bfloat16).double().mean()
    assert float((err.double() ** 2).mean()) == pytest.approx(float(predicted), rel=0.05)


@pytest.mark.parametrize("shape", [(256, 256), (300, 900), (1024, 1024)])
def test_noise_floor_bounds_rounding_noise_and_is_tight_for_homogeneous_weights(shape):
    w = torch.randn(*shape, generator=_gen(3)) * 0.02
    noise = (w.to(torch.bfloat16).float() - w).double()
    sigma1 = float(torch.linalg.matrix_norm(noise, 2))
    var = spectra.rounding_variance(w, torch.bfloat16).double()
    floor = spectra.noise_floor(var.sum(1), var.sum(0))
    assert sigma1 < floor < 1.35 * sigma1


def test_noise_floor_stays_an_upper_bound_with_outlier_columns():
    w = torch.randn(512, 768, generator=_gen(4)) * 0.02
    w[:, :6] *= 40.0                              # a few "massive" input channels
    noise = (w.to(torch.bfloat16).float() - w).double()
    var = spectra.rounding_variance(w, torch.bfloat16).double()
    mean_edge = math.sqrt(float(var.mean())) * (math.sqrt(512) + math.sqrt(768))
    sigma1 = float(torch.linalg.matrix_norm(noise, 2))
    assert sigma1 > 2 * mean_edge                 # the average-variance MP edge would be fooled
    assert sigma1 < spectra.noise_floor(var.sum(1), var.sum(0))


def test_rank_energy_stable_and_signal_rank():
    s = np.array([3.0, 2.0, 1.0])
    total = float(np.sum(s ** 2))                 # 14: 90% is 12.6, reached by 9 + 4 = 13
    assert spectra.rank_for_energy(s, total) == 2
    assert spectra.rank_for_energy(s, total, frac=0.5) == 1
    assert spectra.rank_for_energy(s[:1], total) is None
    assert spectra.rank_for_energy(np.zeros(0), 0.0) == 0
    assert spectra.stable_rank(s, total) == pytest.approx(14 / 9)
    assert spectra.signal_rank(s, 1.0) == 2       # strictly above the floor
    assert spectra.signal_rank(s, 0.5) == 3


def test_rank_for_energy_of_an_exact_rank_r_matrix():
    g = _gen(5)
    m = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 150, generator=g, dtype=torch.float64)
    s, complete = spectra.singular_values(m, 32)
    assert complete
    assert spectra.rank_for_energy(s, float((m ** 2).sum()), frac=1.0) == 6


def test_exact_path_returns_the_full_spectrum():
    m = torch.randn(120, 80, generator=_gen(6))
    s, complete = spectra.singular_values(m, 10)
    assert complete and s.size == 80
    np.testing.assert_allclose(s, np.linalg.svd(m.double().numpy(), compute_uv=False), rtol=1e-10)
    assert spectra.top_singular_values(m, 10).size == 10


def test_randomized_path_recovers_a_low_rank_spectrum():
    g = _gen(7)
    shape = (1100, 1050)
    assert min(shape) > spectra.EXACT_SVD_MAX_DIM
    u = torch.linalg.qr(torch.randn(shape[0], 8, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(shape[1], 8, generator=g, dtype=torch.float64))[0]
    sig = torch.linspace(1.0, 0.2, 8, dtype=torch.float64)
    m = (u * sig) @ v.T + 1e-5 * torch.randn(*shape, generator=g, dtype=torch.float64)
    s, complete = spectra.singular_values(m.float(), 12)
    assert not complete and s.size == 12
    np.testing.assert_allclose(s[:8], sig.numpy(), rtol=1e-4)
    assert s[8] < 1e-3


def test_lowrank_spectrum_equals_svd_of_the_dense_product():
    g = _gen(8)
    B = torch.randn(300, 8, generator=g)
    A = torch.randn(8, 200, generator=g)
    scale = spectra.lora_scale(16, 8)
    dense = np.linalg.svd(scale * (B.double() @ A.double()).numpy(), compute_uv=False)[:8]
    np.testing.assert_allclose(spectra.lowrank_spectrum(B, A, scale), dense, rtol=1e-5)


def test_lowrank_spectrum_rslora_scale():
    g = _gen(9)
    B = torch.randn(64, 16, generator=g, dtype=torch.float64)
    A = torch.randn(16, 96, generator=g, dtype=torch.float64)
    scale = spectra.lora_scale(32, 16, use_rslora=True)
    assert scale == pytest.approx(32 / 4)
    dense = np.linalg.svd(scale * (B @ A).numpy(), compute_uv=False)[:16]
    np.testing.assert_allclose(spectra.lowrank_spectrum(B, A, scale), dense, rtol=1e-5)
    assert spectra.lora_scale(32, 16) == 2.0


def test_lowrank_spectrum_rejects_factors_that_do_not_chain():
    with pytest.raises(ValueError):
        spectra.lowrank_spectrum(torch.zeros(4, 2), torch.zeros(3, 5))


def test_numerical_floor_follows_the_matrix_rank_convention():
    assert spectra.numerical_floor(2.0, (100, 300)) == pytest.approx(2.0 * 300 * np.finfo(np.float32).eps)
