"""Integration on the real SmolLM2-135M-Instruct (bundled GGUF, converted once): the CLI end to end."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from profiler.cli import main
from profiler.rules import REGIMES

pytestmark = pytest.mark.slow
ARGS = ["--length", "512", "--num", "2", "--no-report", "--quiet"]


@pytest.fixture(scope="module")
def two_runs(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    for name in ("a", "b"):
        assert main(["profile", "smollm2-135m", "--out", str(root / name), *ARGS]) == 0
    return root


def test_real_model_profile_fields(two_runs):
    data = json.loads((two_runs / "a/profile.json").read_text())
    m = data["model"]
    assert (m["num_layers"], m["num_heads"], m["num_kv_heads"], m["head_dim"]) == (30, 9, 3, 64)
    assert m["rope_theta"] == 100000.0 and m["max_positions"] == 8192
    assert len(data["heads"]) == 270
    for h in data["heads"]:
        for key in ("gamma", "intercept", "r2", "exp_r2", "sink_mass", "local_mass", "entropy"):
            assert h[key] is not None and math.isfinite(h[key]), (h, key)
        assert all(math.isfinite(x) for x in h["gamma_ci"])
        assert h["regime"] in REGIMES
        assert 0 <= h["sink_mass"] <= 1 and 0 <= h["local_mass"] <= 1 and 0 <= h["entropy"] <= 1.0001
    ml = data["model_level"]
    assert ml["gamma_ci"][0] <= ml["gamma"] <= ml["gamma_ci"][1]
    assert ml["gamma_pade"] == pytest.approx((2e5 - 512 * 2 ** 0.5) / (2e5 + 512 * 2 ** 0.5), rel=1e-5)


def test_real_model_is_deterministic(two_runs):
    assert (two_runs / "a/profile.json").read_bytes() == (two_runs / "b/profile.json").read_bytes()


def test_gguf_file_loads_directly(tmp_path):
    from profiler.demo_model import bundled_gguf
    assert main(["profile", str(bundled_gguf()), "--out", str(tmp_path / "g"), "--length", "128",
                 "--num", "1", "--probes", "random", "--no-report", "--quiet"]) == 0
    assert len(json.loads((tmp_path / "g/profile.json").read_text())["heads"]) == 270


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gate_false_alarm_bf16_rounding_only(demo_dir, tmp_path_factory, seed, capsys):
    """base vs base saved in bf16 (rounding only, no adapter) must pass on every probe seed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    bf16 = tmp_path_factory.getbasetemp() / "base-bf16"
    if not bf16.exists():
        AutoModelForCausalLM.from_pretrained(demo_dir).to(torch.bfloat16).save_pretrained(bf16)
        AutoTokenizer.from_pretrained(demo_dir).save_pretrained(bf16)
    code = main(["profile", str(demo_dir), "vs", str(bf16), "--out", str(tmp_path_factory.mktemp("fa")),
                 "--seed", str(seed), "--length", "512", "--num", "4", "--json", "--no-report", "--quiet",
                 "--no-weights"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0, data["reasons"]
    assert data["verdict"] == "pass"
