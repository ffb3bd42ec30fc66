"""The streamed weight diff, on checkpoints whose ΔW is known by construction."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from profiler import weights
from profiler.errors import AttnprofError
from profiler.weights import adapter_deltas, checkpoint_tensors, diff_weights

TARGETS = ["q_proj", "v_proj"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _save(directory: Path, tensors: dict[str, torch.Tensor], shard_size: int | None = None) -> Path:
    """Write tensors as model.safetensors, or as shards of `shard_size` tensors plus an index."""
    if shard_size is None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
        return directory
    names = list(tensors)
    groups = [names[i:i + shard_size] for i in range(0, len(names), shard_size)]
    return _save_shards(directory, ({n: tensors[n] for n in group} for group in groups), len(groups))


def _save_shards(directory: Path, shards, count: int) -> Path:
    """Write an iterable of {name: tensor} shards as model-0000i-of-0000n files plus the index."""
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{count:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _cast(source: Path, target: Path, dtype: torch.dtype) -> Path:
    """Copy a single-file checkpoint with every float tensor cast to dtype (as users save bf16)."""
    from safetensors.torch import load_file
    return _save(target, {k: v.to(dtype) for k, v in load_file(str(source / "model.safetensors")).items()})


def _rank8(shape: tuple[int, int], seed: int, size: float = 0.02) -> torch.Tensor:
    g = _gen(seed)
    return size * torch.randn(shape[0], 8, generator=g) @ torch.randn(8, shape[1], generator=g)


def _targeted(wd) -> list:
    return [t for t in wd.tensors if t.name.endswith(("q_proj.weight", "v_proj.weight"))]


def _others(wd) -> list:
    return [t for t in wd.tensors if not t.name.endswith(("q_proj.weight", "v_proj.weight"))]


# --- a tiny Llama with a real peft adapter -------------------------------------------------------

@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict[str, Path]:
    """Base, adapter and merged checkpoints of a tiny random Llama (hidden 256, 2 layers).

    The adapter is a real peft LoRA (r=8, alpha=16, q_proj+v_proj) with random non-zero B, merged
    with merge_and_unload(). Saved: base fp32 and bf16, merged fp32 (single file and sharded) and
    bf16 (from the fp32 merge, as users save it).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    _cast(root / "base", root / "base_bf16", torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    peft_model.save_pretrained(root / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(root / "merged")
    merged.save_pretrained(root / "merged_sharded", max_shard_size="300KB")
    _cast(root / "merged", root / "merged_bf16", torch.bfloat16)
    return {k: root / k for k in ("base", "base_bf16", "adapter", "merged", "merged_sharded", "merged_bf16")}


def test_exact_copy_is_unchanged(lora, tmp_path):
    shutil.copytree(lora["base"], tmp_path / "copy")
    wd = diff_weights(lora["base"], tmp_path / "copy")
    assert wd.num_tensors == 21 and wd.num_changed == 0 and wd.max_signal_rank == 0
    assert all(t.status == "unchanged" and t.rel_norm == 0 and t.fro_norm == 0 for t in wd.tensors)
    assert wd.flags == []


def test_fp32_merge_is_exactly_rank_8_on_targets_and_nothing_else(lora):
    wd = diff_weights(lora["base"], lora["merged"], target_modules=TARGETS)
    assert len(_targeted(wd)) == 4
    for t in _targeted(wd):
        assert (t.status, t.signal_rank, t.in_targets, t.svd) == ("low-rank", 8, True, "exact")
        assert t.rel_norm > 0.01 and t.rank90 <= 8 and 1 < t.stable_rank < 8
    for t in _others(wd):
        assert t.status == "unchanged" and t.fro_norm == 0 and t.in_targets is False
    assert not [f for f in wd.flags if f.severity != "info"]
    assert wd.max_signal_rank == 8 and wd.num_outside_targets == 0


def test_adapter_spectrum_matches_the_measured_merge(lora):
    wd = diff_weights(lora["base"], lora["merged"], adapter_dir=lora["adapter"])
    assert wd.adapter_rank == 8
    for t in _targeted(wd):
        assert t.in_targets and t.adapter_rank == 8 and t.adapter_scale == 2.0
        np.testing.assert_allclose(t.top_singular_values[:8], t.adapter_singular_values, rtol=1e-5)
        assert t.adapter_rel_error < 1e-5
    assert "merge_unfaithful" not in wd.flag_codes
    assert all(t.in_targets is False for t in _others(wd))


def test_adapter_deltas_reproduce_peft_merge(lora):
    from safetensors.torch import load_file
    base = load_file(str(lora["base"] / "model.safetensors"))
    merged = load_file(str(lora["merged"] / "model.safetensors"))
    deltas = adapter_deltas(lora["adapter"])
    assert sorted(deltas) == sorted(t for t in base if t.endswith(("q_proj.weight", "v_proj.weight")))
    for name, d in deltas.items():
        assert d.rank == 8 and d.scale == 2.0
        torch.testing.assert_close(d.dense(), (merged[name] - base[name]).double(), rtol=0, atol=1e-6)


def test_bf16_merge_against_fp32_base_reads_rank_8_and_rounding_only(lora):
    wd = diff_weights(lora["base"], lora["merged_bf16"], adapter_dir=lora["adapter"])
    for t in _targeted(wd):
        assert (t.status, t.signal_rank) == ("low-rank", 8)
        assert t.noise_floor > 1e-4                               # the bf16 floor, far above fp32's
        assert t.top_singular_values[8] < t.noise_floor < t.top_singular_values[7]
        assert t.adapter_rel_error < 0.05 and t.adapter_residual_noise < 2
    matrices = [t for t in _others(wd) if len(t.shape) == 2]
    assert matrices and all(t.status == "rounding only" and not t.changed for t in matrices)
    assert all(t.status in ("rounding only", "unchanged") for t in _others(wd))
    codes = wd.flag_codes
    assert "dtype_change" in codes
    assert not {"changed_outside_targets", "not_pure_lora", "merge_unfaithful"} & set(codes)


def test_bf16_merge_against_bf16_base(lora):
    wd = diff_weights(lora["base_bf16"], lora["merged_bf16"], target_modules=TARGETS, adapter_rank=8)
    assert [t.signal_rank for t in _targeted(wd)] == [8, 8, 8, 8]
    assert all(t.status == "unchanged" for t in _others(wd))
    assert wd.flag_codes == []


def test_sharded_checkpoint_diffs_like_the_single_file(lora):
    assert len(set(checkpoint_tensors(lora["merged_sharded"]).values())) > 3
    single = diff_weights(lora["base"], lora["merged"], adapter_dir=lora["adapter"])
    sharded = diff_weights(lora["base"], lora["merged_sharded"], adapter_dir=lora["adapter"])
    assert [t.to_dict() for t in sharded.tensors] == [t.to_dict() for t in single.tensors]
    assert sharded.flag_codes == single.flag_codes


def test_results_render(lora):
    calls = []
    wd = diff_weights(lora["base"], lora["merged_bf16"], target_modules=TARGETS,
                      progress=lambda i, n, name: calls.append((i, n)))
    assert calls[-1] == (21, 21) and len(calls) == 21
    data = json.loads(wd.to_json())
    assert data["num_tensors"] == 21 and data["flags"][0]["code"] == "dtype_change"
    frame = wd.to_frame()
    assert len(frame) == 21 and {"name", "status", "signal_rank", "sigma_1"} <= set(frame.columns)
    assert "WeightDiff" in wd._repr_html_()
    assert wd["model.layers.0.self_attn.q_proj.weight"].signal_rank == 8


# --- synthetic checkpoints -----------------------------------------------------------------------

def test_randomized_path_reads_rank_8_in_fp32_and_bf16(tmp_path):
    shape = (1024, 1024)
    w0 = torch.randn(*shape, generator=_gen(10)) * 0.02
    delta = _rank8(shape, 11, size=0.005)
    name = "model.layers.0.self_attn.q_proj.weight"
    base = _save(tmp_path / "base", {name: w0})
    for dtype in (torch.float32, torch.bfloat16):
        merged = _save(tmp_path / f"merged_{dtype}", {name: (w0 + delta).to(dtype)})
        t = diff_weights(base, merged, adapter_rank=8)[name]
        assert (t.svd, t.status, t.signal_rank, t.signal_rank_is_lower_bound) == ("randomized", "low-rank", 8, False)
        exact = torch.linalg.svdvals(delta.double())[:8].numpy()
        np.testing.assert_allclose(t.top_singular_values[:8], exact, rtol=1e-3)


def test_randomized_path_reports_a_dense_change_as_a_lower_bound(tmp_path):
    w0 = torch.randn(1024, 1024, generator=_gen(14)) * 0.02
    name = "model.layers.0.mlp.up_proj.weight"
    noisy = w0 + 1e-3 * torch.randn(1024, 1024, generator=_gen(15))
    wd = diff_weights(_save(tmp_path / "b", {name: w0}), _save(tmp_path / "m", {name: noisy}), adapter_rank=8)
    t = wd[name]
    assert (t.svd, t.status, t.signal_rank_is_lower_bound) == ("randomized", "high-rank", True)
    assert t.signal_rank == weights.MAX_RANK_PROBE and t.rank90_is_lower_bound
    assert len(t.top_singular_values) == 32
    assert "≥256" in {f.code: f for f in wd.flags}["not_pure_lora"].message


@pytest.mark.parametrize("size", [256, 1024])
def test_change_below_the_bf16_floor_is_not_a_rank(tmp_path, size):
    w0 = torch.randn(size, size, generator=_gen(12)) * 0.02
    tiny = _rank8((size, size), 13, size=2e-7)    # σ_1 ≈ 6e-5 (size 256) vs a bf16 floor ≈ 2e-3
    name = "model.layers.0.self_attn.v_proj.weight"
    base = _save(tmp_path / "base", {name: w0.to(torch.bfloat16)})
    merged = _save(tmp_path / "merged", {name: (w0 + tiny).to(torch.bfloat16)})
    wd = diff_weights(base, merged, target_modules=TARGETS, adapter_rank=8)
    t = wd[name]
    assert t.changed and t.fro_norm > 0
    assert (t.status, t.signal_rank) == ("below floor", 0)
    assert float(torch.linalg.matrix_norm(tiny.double(), 2)) < 0.1 * t.noise_floor
    assert "below_floor" in wd.flag_codes and "not_pure_lora" not in wd.flag_codes


def _layer(seed: int, dim: int = 128) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    names = ["q_proj", "k_proj", "v_proj", "o_proj"]
    out = {f"model.layers.0.self_attn.{n}.weight": 0.02 * torch.randn(dim, dim, generator=g) for n in names}
    out["model.layers.0.input_layernorm.weight"] = torch.ones(dim)
    return out


def test_flags_outside_targets_and_full_rank_change(tmp_path):
    base = _layer(20)
    merged = dict(base)
    p = "model.layers.0.self_attn."
    merged[p + "q_proj.weight"] = base[p + "q_proj.weight"] + _rank8((128, 128), 21)
    merged[p + "v_proj.weight"] = base[p + "v_proj.weight"] + 1e-3 * torch.randn(128, 128, generator=_gen(22))
    merged[p + "k_proj.weight"] = base[p + "k_proj.weight"] + _rank8((128, 128), 23)
    merged["model.layers.0.input_layernorm.weight"] = torch.ones(128) * 1.01
    wd = diff_weights(_save(tmp_path / "b", base), _save(tmp_path / "m", merged),
                      target_modules=TARGETS, adapter_rank=8)
    assert wd[p + "q_proj.weight"].signal_rank == 8
    v = wd[p + "v_proj.weight"]
    assert v.status == "high-rank" and v.signal_rank > 100
    flags = {f.code: f for f in wd.flags}
    assert flags["not_pure_lora"].tensors == [p + "v_proj.weight"]
    assert flags["not_pure_lora"].severity == "warning"
    assert sorted(flags["changed_outside_targets"].tensors) == ["model.layers.0.input_layernorm.weight",
                                                               p + "k_proj.weight"]
    assert wd.num_outside_targets == 2 and wd[p + "o_proj.weight"].status == "unchanged"
    assert wd["model.layers.0.input_layernorm.weight"].status == "changed"


def test_high_rank_without_any_adapter_information(tmp_path):
    base = _layer(24)
    merged = {k: v + 1e-3 * torch.randn(v.shape, generator=_gen(25)) for k, v in base.items()}
    wd = diff_weights(_save(tmp_path / "b", base), _save(tmp_path / "m", merged))
    assert all(t.in_targets is None for t in wd.tensors)
    assert {"high_rank_change", "targets_unknown"} <= set(wd.flag_codes)


def test_missing_extra_and_reshaped_tensors(tmp_path):
    base = _layer(30)
    merged = dict(base)
    p = "model.layers.0.self_attn."
    del merged[p + "o_proj.weight"]
    merged[p + "k_proj.weight"] = torch.zeros(64, 128)
    merged[p + "q_proj.lora_A.weight"] = torch.zeros(8, 128)
    base["lm_head.weight"] = torch.zeros(10, 128)               # tied on the merged side
    wd = diff_weights(_save(tmp_path / "b", base), _save(tmp_path / "m", merged))
    flags = {f.code: f for f in wd.flags}
    assert flags["missing_tensors"].tensors == [p + "o_proj.weight"]
    assert flags["missing_tensors"].severity == "error"
    assert flags["extra_tensors"].tensors == [p + "q_proj.lora_A.weight"]
    assert "not merged" in flags["extra_tensors"].message
    assert flags["shape_mismatch"].tensors == [p + "k_proj.weight"]
    assert "128×128 → 64×128" in flags["shape_mismatch"].message
    assert flags["tied_embeddings"].severity == "info"
    assert wd[p + "k_proj.weight"].status == "shape mismatch"
    assert wd.num_missing == 1 and wd.num_extra == 1


def test_non_finite_weights_are_an_error_flag(tmp_path):
    base = _layer(31)
    merged = dict(base)
    broken = base["model.layers.0.self_attn.o_proj.weight"].clone()
    broken[3, 5] = float("nan")
    merged["model.layers.0.self_attn.o_proj.weight"] = broken
    wd = diff_weights(_save(tmp_path / "b", base), _save(tmp_path / "m", merged))
    t = wd["model.layers.0.self_attn.o_proj.weight"]
    assert (t.status, t.non_finite, t.changed) == ("non-finite", ["merged"], True)
    flag = {f.code: f for f in wd.flags}["non_finite"]
    assert flag.severity == "error" and "merged" in flag.message
    assert json.loads(wd.to_json())["num_changed"] == 1


def test_nothing_in_common_is_an_error(tmp_path):
    a = _save(tmp_path / "a", {"x.weight": torch.zeros(4, 4)})
    b = _save(tmp_path / "b", {"x.weight": torch.zeros(4, 5), "y.weight": torch.zeros(2)})
    with pytest.raises(AttnprofError, match="share no tensor"):
        diff_weights(a, b)


def test_merge_with_the_wrong_scale_is_flagged(tmp_path, lora):
    from safetensors.torch import load_file
    base = load_file(str(lora["base"] / "model.safetensors"))
    wrong = dict(base)
    for name, d in adapter_deltas(lora["adapter"]).items():       # alpha/sqrt(r) instead of alpha/r
        wrong[name] = base[name] + (d.dense() * np.sqrt(8)).float()
    wd = diff_weights(lora["base"], _save(tmp_path / "wrong", wrong), adapter_dir=lora["adapter"])
    flag = {f.code: f for f in wd.flags}["merge_unfaithful"]
    assert len(flag.tensors) == 4
    assert all(t.adapter_rel_error == pytest.approx(np.sqrt(8) - 1, rel=1e-4) for t in _targeted(wd))


def test_unmerged_adapter_is_flagged(lora):
    wd = diff_weights(lora["base"], lora["base"], adapter_dir=lora["adapter"])
    assert len({f.code: f for f in wd.flags}["merge_unfaithful"].tensors) == 4
    assert all(t.adapter_rel_error == pytest.approx(1.0) for t in _targeted(wd))


def test_rslora_rank_and_alpha_patterns_match_peft(tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=100))
    model.save_pretrained(tmp_path / "base")
    config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=TARGETS,
                        rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 32})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    deltas = adapter_deltas(tmp_path / "adapter")
    q, v = (deltas[f"model.layers.0.self_attn.{m}.weight"] for m in ("q_proj", "v_proj"))
    assert (q.rank, q.scale) == (8, pytest.approx(16 / np.sqrt(8)))
    assert (v.rank, v.scale) == (4, pytest.approx(32 / 2))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for d in (q, v):
        torch.testing.assert_close(d.dense(), (merged[d.weight] - base[d.weight]).double(), rtol=0, atol=1e-6)
    wd = diff_weights(tmp_path / "base", tmp_path / "merged", adapter_dir=tmp_path / "adapter")
    assert [wd[d.weight].signal_rank for d in (q, v)] == [8, 4]
    assert "not_pure_lora" not in wd.flag_codes and "merge_unfaithful" not in wd.flag_codes


# --- unreadable input ---------------------------------------------------------------------------

def test_truncated_and_garbage_files_are_one_line_errors(tmp_path):
    good = _save(tmp_path / "good", {"w": torch.randn(64, 64)})
    data = (good / "model.safetensors").read_bytes()
    cases = {"truncated": data[:-500], "garbage": bytes(range(256)) * 20, "empty": b""}
    for label, payload in cases.items():
        bad = tmp_path / label
        bad.mkdir()
        (bad / "model.safetensors").write_bytes(payload)
        with pytest.raises(AttnprofError) as info:
            diff_weights(good, bad)
        message = str(info.value)
        assert str(bad / "model.safetensors") in message and "\n" not in message


def test_missing_paths_and_shards_are_errors(tmp_path):
    good = _save(tmp_path / "good", {"w": torch.randn(8, 8)})
    with pytest.raises(AttnprofError, match="no such file"):
        diff_weights(good, tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttnprofError, match="no safetensors weights"):
        diff_weights(good, tmp_path / "empty")
    sharded = _save(tmp_path / "sharded", {"w": torch.randn(8, 8), "v": torch.randn(8)}, shard_size=1)
    index = sharded / "model.safetensors.index.json"
    listing = json.loads(index.read_text())
    listing["weight_map"]["u"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(listing))
    with pytest.raises(AttnprofError, match="tensor u listed in model.safetensors.index.json is not in it"):
        diff_weights(good, sharded)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(AttnprofError, match="model-00002-of-00002.safetensors: shard listed"):
        diff_weights(good, sharded)
    with pytest.raises(AttnprofError, match="not a PEFT adapter"):
        diff_weights(good, good, adapter_dir=tmp_path / "empty")


# --- memory ---------------------------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from profiler.weights import diff_weights

    def kib(key):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key))

    diff_weights(sys.argv[3], sys.argv[4])              # load every library on a tiny pair
    with open("/proc/self/clear_refs", "w") as fh:      # reset the peak-RSS mark (VmHWM)
        fh.write("5")
    before = kib("VmRSS")
    wd = diff_weights(sys.argv[1], sys.argv[2])
    assert wd.num_changed == wd.num_tensors, wd.num_changed
    print((kib("VmHWM") - before) * 1024)
""")
FIXED_ALLOWANCE = 32 << 20     # BLAS/LAPACK workspaces and allocator caches, independent of the model


def _peak_growth(base: Path, merged: Path, tiny_base: Path, tiny_merged: Path) -> int:
    """Peak resident memory of one diff above the resident memory before it, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(base), str(merged), str(tiny_base),
                          str(tiny_merged)], capture_output=True, text=True, cwd=REPO, check=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_does_not_grow_with_model_size(tmp_path):
    """Peak RSS growth of a diff (fresh process, /proc VmHWM) stays within three tensor pairs plus
    a fixed allowance, and a checkpoint four times larger does not raise it."""
    shape = (4096, 1024)
    pair_bytes = 2 * shape[0] * shape[1] * 4
    tiny = {"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=_gen(40))}
    tiny_base = _save(tmp_path / "tiny_b", tiny)
    tiny_merged = _save(tmp_path / "tiny_m", {k: v + _rank8(v.shape, 41) for k, v in tiny.items()})

    def shard(i: int, merged: bool) -> dict[str, torch.Tensor]:
        w = 0.02 * torch.randn(*shape, generator=_gen(100 + i))
        return {f"model.layers.{i}.self_attn.q_proj.weight": w + _rank8(shape, i, size=0.005) if merged else w}

    growth = {}
    for count in (8, 32):                                # one tensor per shard, generated lazily
        b = _save_shards(tmp_path / f"b{count}", (shard(i, False) for i in range(count)), count)
        m = _save_shards(tmp_path / f"m{count}", (shard(i, True) for i in range(count)), count)
        growth[count] = _peak_growth(b, m, tiny_base, tiny_merged)
        shutil.rmtree(b)
        shutil.rmtree(m)
    assert growth[32] < 3 * pair_bytes + FIXED_ALLOWANCE, growth
    # the property is "does not grow": a larger peak for the smaller checkpoint (seen once, under
    # another process's memory pressure evicting resident library pages) is not a failure
    assert growth[32] - growth[8] < pair_bytes, growth


def _peft_merge(root: Path, model, config) -> tuple[Path, Path, Path]:
    """Save base, adapter (random non-zero factors) and peft's merge_and_unload() of `model`."""
    import copy

    from peft import get_peft_model
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(root / "base")
    wrapped = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=_gen(len(name))) * 0.02)
    wrapped.save_pretrained(root / "adapter")
    wrapped.merge_and_unload().save_pretrained(root / "merged")
    return root / "base", root / "adapter", root / "merged"


@pytest.mark.parametrize("case", ["gpt2-conv1d-and-linear", "tied-head", "modules-to-save"])
def test_peft_merges_read_exactly_whatever_the_module_layout(tmp_path, case):
    """Real peft merges the check must read as exact rank-r changes on their targets, no flags:
    GPT-2's Conv1D beside an nn.Linear (peft flips fan_in_fan_out per module and saves the last
    value, here False), LoRA on an output head tied to the input embeddings (stored only as the
    embedding), and a module saved whole (modules_to_save: any rank is expected there)."""
    from peft import LoraConfig
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    llama = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=300)
    if case == "gpt2-conv1d-and-linear":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                           tie_word_embeddings=False))
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["attn.c_proj", "lm_head"], init_lora_weights=False)
    elif case == "tied-head":
        model = LlamaForCausalLM(LlamaConfig(**llama, tie_word_embeddings=True))
        config = LoraConfig(r=3, lora_alpha=6, target_modules=["lm_head"], init_lora_weights=False)
    else:
        model = LlamaForCausalLM(LlamaConfig(**llama, tie_word_embeddings=False))
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    base, adapter, merged = _peft_merge(tmp_path, model, config)
    if case == "gpt2-conv1d-and-linear":
        assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    wd = diff_weights(base, merged, adapter_dir=adapter)
    changed = [t for t in wd.tensors if t.changed]
    assert changed and all(t.in_targets for t in changed)
    lora_changed = [t for t in changed if t.adapter_rank is not None]
    assert lora_changed and all(t.signal_rank == t.adapter_rank == config.r for t in lora_changed)
    assert all(t.adapter_rel_error < 1e-6 for t in lora_changed)
    if case == "tied-head":
        assert [t.name for t in changed] == ["model.embed_tokens.weight"]
    if case == "modules-to-save":
        head = next(t for t in changed if t.name == "lm_head.weight")
        assert head.adapter_rank is None and head.signal_rank > 4 * config.r
    assert [f.code for f in wd.flags if f.severity != "info"] == []
