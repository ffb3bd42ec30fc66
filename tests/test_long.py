"""Long sequences: capture never builds a T×T map (memory grows O(T), not O(T²)), up to T = 32K."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import json, sys, pathlib, torch
    sys.path.insert(0, "tests")
    from conftest import tiny_model
    from profiler import capture as cap

    def peak_mb():
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    length, estimator = int(sys.argv[1]), sys.argv[2]
    cap.register()
    model = tiny_model(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=length, attn_implementation=cap.ATTN_NAME)
    ids = torch.randint(1, 299, (1, length)).numpy()
    cap.capture(model, ids[:, :64], window=8, estimator=estimator)    # warm-up
    pathlib.Path("/proc/self/clear_refs").write_text("5")   # reset the high-water mark
    before = peak_mb()
    out = cap.capture(model, ids, window=cap.default_window(length), estimator=estimator)
    print(json.dumps({"growth_mb": peak_mb() - before, "shape": list(out.A.shape)}))
""")


def run_child(length: int, estimator: str = "tail") -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(length), estimator], capture_output=True,
                         text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for peak RSS")
def test_capture_memory_stays_far_below_one_attention_map():
    length, heads = 16384, 4
    one_layer_maps_mb = length * length * heads * 4 / 2**20          # 4096 MiB of fp32 T×T maps
    budget_mb = 512
    assert one_layer_maps_mb >= 8 * budget_mb
    result = run_child(length)
    assert result["shape"] == [1, 1, heads, length - 256 + 1]
    assert result["growth_mb"] < budget_mb, result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for peak RSS")
def test_capture_memory_grows_linearly_not_quadratically():
    small, large = run_child(4096)["growth_mb"], run_child(16384)["growth_mb"]
    # 4× the length: a T×T allocation would grow 16×; O(W·T) grows about 4×
    assert large < 8 * max(small, 8.0), (small, large)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for peak RSS")
@pytest.mark.parametrize("estimator", ["tail", "dense"])
def test_32k_probe_runs_within_a_budget_far_below_its_maps(estimator):
    """T = 32768: one layer's T×T fp32 maps of 4 heads would take 16 GiB; capture stays under 1 GiB,
    for the tail window and for the dense estimator (every query, binned by distance)."""
    length, heads, budget_mb = 32768, 4, 1024
    assert length * length * heads * 4 / 2**20 >= 16 * budget_mb
    result = run_child(length, estimator)
    distances = length if estimator == "dense" else length - 256 + 1
    assert result["shape"] == [1, 1, heads, distances]
    assert result["growth_mb"] < budget_mb, result
