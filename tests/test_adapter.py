"""Tests of `attnprof check-adapter` (profiler/adapter.py).

Every expected value here is known independently of the code under test: trainable parameter
counts come from peft itself (`get_nb_trainable_parameters`) or from hand arithmetic, module
matches from peft's own `check_target_module_exists` or from counting an architecture's layers,
sizes from the safetensors file layout, evidence gaps from the published table by hand.
No weights are downloaded; base architectures are tiny configs built on the meta device.
"""
from __future__ import annotations

import io
import json
import math
import struct
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (AutoModelForCausalLM, GPT2Config, GPTBigCodeConfig, GPTNeoXConfig,
                          LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, T5Config)

from profiler import rules
from profiler.adapter import (FINDING_CODES, AdapterCheck, Finding, adapter_scale, check_adapter,
                              format_report, forgetting_evidence, load_adapter_config,
                              load_forgetting_evidence, run_check_adapter)
from profiler.errors import AttnprofError

# --- tiny architectures ------------------------------------------------------------------------

LAYERS = 2


DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=100)
TINY = {
    "llama": (LlamaConfig, DECODER),
    "qwen2": (Qwen2Config, DECODER),
    "mistral": (MistralConfig, DECODER),
    "gpt2": (GPT2Config, dict(n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64, vocab_size=100,
                              bos_token_id=0, eos_token_id=0)),
    "opt": (OPTConfig, dict(hidden_size=32, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                            word_embed_proj_dim=32, max_position_embeddings=64, vocab_size=100)),
    "neox": (GPTNeoXConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                 num_attention_heads=4, vocab_size=100)),
    "bigcode": (GPTBigCodeConfig, dict(n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64, vocab_size=100,
                                       bos_token_id=0, eos_token_id=0)),
}


def tiny(kind: str, **over):
    """A tiny config of one of the architectures the check must handle."""
    cls, defaults = TINY[kind]
    return cls(**{**defaults, **over})


LLAMA = tiny("llama")


def lora(**over) -> dict:
    """A modern peft LoRA config dict (keys as peft 0.21 writes them)."""
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
           "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.05, "bias": "none",
           "use_rslora": False, "use_dora": False, "modules_to_save": None,
           "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
           "base_model_name_or_path": None, "fan_in_fan_out": False, "inference_mode": True}
    cfg.update(over)
    return cfg


def codes(check: AdapterCheck, severity: str | None = None) -> set[str]:
    return check.codes(severity)


# --- real peft-saved adapters ------------------------------------------------------------------

def _peft_configs():
    import peft
    return {
        "lora": peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                task_type="CAUSAL_LM"),
        "lora_embed_mts": peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "embed_tokens"],
                                          modules_to_save=["lm_head"], task_type="CAUSAL_LM"),
        "dora": peft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "down_proj"]),
        "lora_bias": peft.LoraConfig(r=4, target_modules=["k_proj"], lora_bias=True, bias="all"),
        "all_linear_patterns": peft.LoraConfig(r=4, target_modules="all-linear", rank_pattern={"q_proj": 2},
                                               alpha_pattern={"down_proj": 64}),
        "layers": peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
        "loha": peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj"]),
        "lokr": peft.LoKrConfig(r=4, target_modules=["q_proj", "gate_proj"]),
        "lokr_both": peft.LoKrConfig(r=1, target_modules=["q_proj", "gate_proj"], decompose_both=True),
        "ia3": peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "vera": peft.VeraConfig(r=4, target_modules=["q_proj", "o_proj"]),
        "adalora": peft.AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=["q_proj"]),
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "prefix_proj": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                               prefix_projection=True, encoder_hidden_size=12),
        "p_tuning": peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                             encoder_hidden_size=16),
        "p_tuning_lstm": peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                  encoder_hidden_size=16,
                                                  encoder_reparameterization_type="LSTM"),
    }


PEFT_NAMES = ["lora", "lora_embed_mts", "dora", "lora_bias", "all_linear_patterns", "layers", "loha",
              "lokr", "lokr_both", "ia3", "vera", "adalora", "prompt", "prefix", "prefix_proj", "p_tuning",
              "p_tuning_lstm"]


def save_peft_adapter(config, model_config, out: Path) -> int:
    """Wrap a random-weight model with peft, save the adapter to `out`, return peft's trainable count."""
    import peft
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config)
    wrapped = peft.get_peft_model(model, config)
    trainable, _ = wrapped.get_nb_trainable_parameters()
    wrapped.save_pretrained(str(out))
    return trainable


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama base directory: config.json only (the check never reads weights)."""
    path = tmp_path_factory.mktemp("bases") / "tiny-llama"
    LLAMA.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory) -> dict[str, tuple[Path, int]]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: (root / name, save_peft_adapter(cfg, LLAMA, root / name))
            for name, cfg in _peft_configs().items()}


def safetensors_data_bytes(path: Path) -> int:
    """Tensor bytes of a safetensors file from its layout: 8-byte header length, header, data."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header_len


def test_real_peft_lora_adapter_fits_its_base(peft_adapters, base_dir):
    path, peft_count = peft_adapters["lora"]
    check = check_adapter(path, base_dir)
    assert check.compatible and check.exit_code == 0
    assert check.trainable_params == peft_count == LAYERS * (8 * (32 + 32) + 8 * (32 + 16))
    assert check.trainable_params_source == "base shapes"
    assert sorted(check.matched_modules) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ("q_proj", "v_proj"))
    assert check.scale == 2.0 and check.scale_formula == "alpha/r"
    assert check.size_bytes == safetensors_data_bytes(path / "adapter_model.safetensors")
    assert not codes(check, "error") and not codes(check, "warning")
    assert "targets_attention_only" in codes(check)
    out, err = io.StringIO(), io.StringIO()
    assert run_check_adapter(str(path), str(base_dir), as_json=True, out=out, err=err) == 0
    data = json.loads(out.getvalue())
    assert data["compatible"] is True and data["trainable_params"] == peft_count
    assert err.getvalue() == ""


@pytest.mark.parametrize("name", PEFT_NAMES)
def test_trainable_params_match_peft_for_every_adapter_type(peft_adapters, base_dir, name):
    path, peft_count = peft_adapters[name]
    check = check_adapter(path, base_dir)
    assert check.trainable_params == peft_count
    assert check.compatible, [f for f in check.findings if f.severity == "error"]
    # The file written by peft matches the config and the base: no shape complaints.
    assert "weights_mismatch" not in codes(check) and "base_mismatch" not in codes(check)
    assert check.size_bytes == safetensors_data_bytes(path / "adapter_model.safetensors")


def test_adapter_types_are_classified(peft_adapters, base_dir):
    by_type = {name: check_adapter(peft_adapters[name][0], base_dir) for name in
               ("dora", "adalora", "loha", "lokr", "ia3", "vera", "prompt", "prefix", "p_tuning")}
    assert by_type["dora"].dora and "dora_merge" in codes(by_type["dora"], "warning")
    assert by_type["adalora"].peft_type == "ADALORA" and "adaptive_rank" in codes(by_type["adalora"])
    assert by_type["adalora"].scale == pytest.approx(8 / 6)        # lora_alpha / init_r
    assert by_type["loha"].scale == pytest.approx(8 / 4)
    assert by_type["lokr"].scale == pytest.approx(8 / 4)
    for name in ("ia3", "vera", "prompt", "prefix", "p_tuning"):
        assert "not_rank_based" in codes(by_type[name]) and by_type[name].scale is None
    for name in ("prompt", "prefix", "p_tuning"):
        assert by_type[name].mergeable is False
        assert by_type[name].evidence["applicable"] is False
    assert by_type["ia3"].mergeable is True


@pytest.mark.parametrize("name", ["lora", "lora_embed_mts", "loha", "ia3"])
def test_trainable_params_from_the_file_without_a_base(peft_adapters, name):
    path, peft_count = peft_adapters[name]
    check = check_adapter(path)                   # peft wrote base_model_name_or_path = None
    assert "base_unknown" in codes(check, "warning") and check.matched_modules == []
    assert check.trainable_params == peft_count and check.trainable_params_source == "adapter file"


def test_vocab_resized_adapter_is_an_error(tmp_path, base_dir):
    import peft
    path = tmp_path / "resized"
    save_peft_adapter(peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                      tiny("llama", vocab_size=120), path)
    check = check_adapter(path, base_dir)
    assert not check.compatible
    resize = [f for f in check.findings if f.code == "embedding_resize" and f.severity == "error"]
    assert resize and "120" in resize[0].message
    out, err = io.StringIO(), io.StringIO()
    assert run_check_adapter(path, base_dir, out=out, err=err) == 1
    assert "NOT compatible" in out.getvalue()


def test_adapter_of_a_wider_model_does_not_fit(tmp_path, base_dir):
    import peft
    path = tmp_path / "wide"
    save_peft_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                      tiny("llama", hidden_size=48, num_attention_heads=4), path)
    check = check_adapter(path, base_dir)
    mismatch = [f for f in check.findings if f.code == "base_mismatch" and f.severity == "error"]
    assert mismatch and "48" in mismatch[0].message
    assert check.exit_code == 1


def test_gpt2_adapter_against_llama_base(tmp_path, base_dir):
    import peft
    path = tmp_path / "gpt2-lora"
    save_peft_adapter(peft.LoraConfig(r=4, target_modules=["c_attn"]), tiny("gpt2"), path)
    check = check_adapter(path, base_dir)
    assert {"targets_missing", "base_mismatch"} <= codes(check, "error")
    assert check.unmatched_targets == ["c_attn"]
    assert "c_attn" in check.finding("targets_missing").message


def test_rank_in_file_differs_from_config(tmp_path, base_dir, peft_adapters):
    src, _ = peft_adapters["lora"]
    path = tmp_path / "edited"
    path.mkdir()
    (path / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["r"] = 16
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    check = check_adapter(path, base_dir)
    assert "weights_mismatch" in codes(check, "error")


def test_file_lacking_some_targets_warns(tmp_path, base_dir, peft_adapters):
    src, _ = peft_adapters["lora"]
    path = tmp_path / "more-targets"
    path.mkdir()
    (path / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "k_proj"]
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    check = check_adapter(path, base_dir)
    warn = [f for f in check.findings if f.code == "weights_mismatch" and f.severity == "warning"]
    assert warn and "2 of 6" in warn[0].message and check.compatible


# --- target matching on real architectures --------------------------------------------------------

# (architecture, attention targets, expected matches per layer, all-linear modules per layer)
ARCHS = [
    ("llama", ["q_proj", "v_proj"], 2, 7),
    ("qwen2", ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 7),
    ("mistral", ["q_proj", "v_proj"], 2, 7),
    ("gpt2", ["c_attn"], 1, 4),
    ("opt", ["q_proj", "v_proj"], 2, 6),
    ("neox", ["query_key_value"], 1, 4),
    ("bigcode", ["c_attn"], 1, 4),
]


@pytest.mark.parametrize("arch,targets,per_layer,linear_per_layer", ARCHS)
def test_targets_against_real_architectures(arch, targets, per_layer, linear_per_layer):
    cfg = tiny(arch)
    check = check_adapter(lora(target_modules=targets), cfg)
    assert len(check.matched_modules) == per_layer * LAYERS
    assert not check.unmatched_targets and "targets_missing" not in codes(check)
    assert "targets_attention_only" in codes(check)
    every = check_adapter(lora(target_modules="all-linear"), cfg)
    assert len(every.matched_modules) == linear_per_layer * LAYERS
    assert "lm_head" not in every.matched_modules
    assert "targets_all_linear" in codes(every) and "targets_attention_only" not in codes(every)


def test_llama_names_against_opt_are_reported_missing():
    check = check_adapter(lora(target_modules=["q_proj", "o_proj", "gate_proj"]), tiny("opt"))
    missing = check.finding("targets_missing")
    assert missing.severity == "warning"
    assert "o_proj" in missing.message and "gate_proj" in missing.message
    assert "q_proj, " not in missing.message.split("only")[0]
    assert check.unmatched_targets == ["o_proj", "gate_proj"]
    none_match = check_adapter(lora(target_modules=["o_proj", "gate_proj"]), tiny("opt"))
    assert none_match.finding("targets_missing").severity == "error"
    assert not none_match.compatible and none_match.matched_modules == []


def test_gpt2_c_attn_matches_conv1d():
    check = check_adapter(lora(target_modules=["c_attn"], r=4), tiny("gpt2"))
    assert check.matched_modules == [f"transformer.h.{i}.attn.c_attn" for i in range(LAYERS)]
    # Conv1D weight (32, 96): LoRA A (4, 32) + B (96, 4) per layer.
    assert check.trainable_params == LAYERS * 4 * (32 + 96)
    assert any("fan_in_fan_out" in f.message for f in check.findings)


def test_list_entries_match_whole_suffix_segments_only():
    check = check_adapter(lora(target_modules=["proj"]), LLAMA)     # 'q_proj' does not end in '.proj'
    assert check.matched_modules == [] and "targets_missing" in codes(check, "error")
    dotted = check_adapter(lora(target_modules=["self_attn.q_proj"]), LLAMA)
    assert len(dotted.matched_modules) == LAYERS


def test_regex_target_is_a_full_match():
    check = check_adapter(lora(target_modules=r".*\.layers\.1\.self_attn\.(q|v)_proj"), LLAMA)
    assert check.matched_modules == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    partial = check_adapter(lora(target_modules=r"q_proj"), LLAMA)     # no match: must be the whole name
    assert partial.matched_modules == [] and "targets_missing" in codes(partial, "error")


def test_unsupported_module_is_an_error():
    check = check_adapter(lora(target_modules=["self_attn"]), LLAMA)
    assert "targets_unsupported" in codes(check, "error") and check.exit_code == 1


def test_exclude_modules_and_modules_to_save_remove_matches():
    check = check_adapter(lora(target_modules="all-linear", exclude_modules=["down_proj", "up_proj"]), LLAMA)
    assert len(check.matched_modules) == 5 * LAYERS


def test_target_modules_null_uses_peft_default():
    check = check_adapter(lora(target_modules=None), LLAMA)
    assert "targets_default" in codes(check)
    assert sorted({m.rsplit(".", 1)[-1] for m in check.matched_modules}) == ["q_proj", "v_proj"]


LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
          "lm_head", "self_attn.q_proj", "mlp", "layers", "model.layers.0.self_attn.k_proj", "proj", "q"]
REGEXES = [r".*\.q_proj", r"model\.layers\.1\..*", r".*(k|v)_proj", r"lm_head", r".*mlp\.(up|down)_proj"]
ORACLE_CFG = tiny("llama", num_hidden_layers=3)


@pytest.fixture(scope="module")
def oracle_names() -> list[str]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(ORACLE_CFG)
    return [n for n, _ in model.named_modules() if n]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(targets=st.one_of(st.lists(st.sampled_from(LEAVES), min_size=1, max_size=4, unique=True),
                         st.sampled_from(REGEXES)),
       layers=st.one_of(st.none(), st.lists(st.integers(0, 4), min_size=1, max_size=3, unique=True)),
       pattern=st.sampled_from([None, "layers"]),
       exclude=st.one_of(st.none(), st.lists(st.sampled_from(LEAVES[:7]), max_size=2, unique=True)))
def test_matching_agrees_with_peft(oracle_names, targets, layers, pattern, exclude):
    from peft.tuners.tuners_utils import check_target_module_exists
    if isinstance(targets, str):
        layers = pattern = None
    peft_cfg = SimpleNamespace(target_modules=targets, layers_to_transform=layers, layers_pattern=pattern,
                               exclude_modules=exclude, modules_to_save=None, target_parameters=None)
    expected = {n for n in oracle_names if check_target_module_exists(peft_cfg, n)}
    check = check_adapter(lora(target_modules=targets, layers_to_transform=layers,
                               layers_pattern=pattern if layers else None, exclude_modules=exclude),
                          ORACLE_CFG)
    assert set(check.matched_modules) == expected


def test_7b_llama_config_is_fast():
    big = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, vocab_size=32000)
    start = time.perf_counter()
    check = check_adapter(lora(r=16, lora_alpha=32), big)
    elapsed = time.perf_counter() - start
    print(f"\n7B Llama config check: {elapsed:.3f} s")
    assert elapsed < 5.0
    assert len(check.matched_modules) == 32 * 2
    assert check.trainable_params == 32 * 2 * 16 * (4096 + 4096)
    assert check.base_params == 6_738_415_616          # Llama-2-7B's published parameter count
    assert check.size_bytes == 4 * check.trainable_params


# --- findings from the config -------------------------------------------------------------------

@pytest.mark.parametrize("r,alpha,rslora,expected_scale,flags", [
    (8, 64, False, 8.0, {"scaling_high"}),
    (16, 1, False, 1 / 16, {"scaling_low"}),
    (8, 32, False, 4.0, set()),                       # exactly at the thresholds: not flagged
    (64, 16, False, 0.25, set()),
    (64, 16, True, 2.0, {"rslora"}),                  # alpha/sqrt(r)
    (4, 16, True, 8.0, {"rslora", "scaling_high"}),
])
def test_effective_scale(r, alpha, rslora, expected_scale, flags):
    check = check_adapter(lora(r=r, lora_alpha=alpha, use_rslora=rslora), LLAMA)
    assert check.scale == pytest.approx(expected_scale)
    assert codes(check) & {"scaling_high", "scaling_low", "rslora"} == flags
    assert adapter_scale(lora(r=r, lora_alpha=alpha, use_rslora=rslora)) == pytest.approx(expected_scale)


def test_per_module_scale_from_patterns():
    cfg = lora(r=8, lora_alpha=16, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 64})
    assert adapter_scale(cfg) == 2.0
    assert adapter_scale(cfg, "model.layers.0.self_attn.q_proj") == 8.0
    assert adapter_scale(cfg, "model.layers.1.self_attn.v_proj") == 8.0
    assert adapter_scale(cfg, "model.layers.0.self_attn.v_proj") == 2.0
    check = check_adapter(cfg, LLAMA)
    assert check.scale_max == 8.0 and check.scale_min == 2.0
    assert "scaling_high" in codes(check) and "adaptive_rank" in codes(check)
    # q_proj at r=2: A (2, 32) + B (32, 2); v_proj at r=8: A (8, 32) + B (16, 8)
    assert check.trainable_params == LAYERS * (2 * 64 + 8 * 48)


def test_pattern_scales_resolve_both_patterns_per_module():
    """rank_pattern names a module that alpha_pattern reaches by suffix: that module's scale is
    64/64 = 1 (as peft sets it), not 8/64 from the default alpha, so nothing is damped."""
    cfg = lora(r=8, lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 64}, alpha_pattern={"q_proj": 64})
    assert adapter_scale(cfg, "model.layers.1.self_attn.q_proj") == 1.0
    check = check_adapter(cfg, LLAMA)
    assert (check.scale_min, check.scale_max) == (1.0, 8.0)
    assert "scaling_low" not in codes(check) and "scaling_high" in codes(check)


def test_adapter_scale_refuses_types_without_alpha():
    with pytest.raises(AttnprofError):
        adapter_scale({"peft_type": "IA3", "target_modules": ["k_proj"]})
    with pytest.raises(AttnprofError):
        adapter_scale(lora(r=0))


def test_adapter_scale_accepts_peft_config_objects():
    import peft
    assert adapter_scale(peft.LoraConfig(r=16, lora_alpha=8, use_rslora=True)) == pytest.approx(2.0)


def test_dora_merge_and_lora_bias_conflict():
    assert "dora_merge" in codes(check_adapter(lora(use_dora=True), LLAMA), "warning")
    assert "config_invalid" in codes(check_adapter(lora(use_dora=True, lora_bias=True), LLAMA), "error")


def test_embedding_resize_from_modules_to_save():
    check = check_adapter(lora(modules_to_save=["embed_tokens", "lm_head"]), LLAMA)
    finding = check.finding("embedding_resize")
    assert finding.severity == "warning" and "lm_head" in finding.message
    assert check.trainable_params == LAYERS * (8 * 64 + 8 * 48) + 2 * 100 * 32
    no_base = check_adapter(lora(modules_to_save=["lm_head"]))
    assert "embedding_resize" in codes(no_base)
    assert "embedding_resize" not in codes(check_adapter(lora(modules_to_save=["score"]), LLAMA))


def test_quantized_base_signals(tmp_path):
    named = check_adapter(lora(base_model_name_or_path="unsloth/llama-3-8b-bnb-4bit"), LLAMA)
    assert "quantized_base" in codes(named, "warning")
    config = LLAMA.to_dict()
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_config = check_adapter(lora(), tmp_path / "config.json")
    assert "quantized_base" in codes(from_config) and "bitsandbytes" in from_config.finding("quantized_base").message
    assert from_config.matched_modules                     # the skeleton is still built
    assert "quantized_base" not in codes(check_adapter(lora(base_model_name_or_path="meta-llama/Llama-2-7b-hf"), LLAMA))


def test_adaptive_rank_from_adalora_masks():
    cfg = {"peft_type": "ADALORA", "init_r": 12, "target_r": 4, "lora_alpha": 32,
           "target_modules": ["q_proj"], "task_type": "CAUSAL_LM",
           "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True] * 3 + [False] * 9,
                            "model.layers.1.self_attn.q_proj.lora_E": [True] * 7 + [False] * 5}}
    check = check_adapter(cfg, LLAMA)
    finding = check.finding("adaptive_rank")
    assert "3..7" in finding.message and check.r == 12
    assert check.scale == pytest.approx(32 / 12)
    assert check.evidence["rank"] == 4


def test_layers_out_of_range():
    some = check_adapter(lora(layers_to_transform=[0, 5]), LLAMA)
    outside = some.finding("layers_out_of_range")
    assert outside.severity == "warning" and "[5]" in outside.message
    assert len(some.matched_modules) == 2
    none = check_adapter(lora(layers_to_transform=7), LLAMA)
    assert {"layers_out_of_range", "targets_missing"} <= codes(none, "error")
    wrong_pattern = check_adapter(lora(layers_to_transform=[0], layers_pattern="blocks"), LLAMA)
    assert "layers_out_of_range" in codes(wrong_pattern, "error")
    right_pattern = check_adapter(lora(layers_to_transform=[1], layers_pattern="layers"), LLAMA)
    assert right_pattern.compatible and len(right_pattern.matched_modules) == 2


def test_not_rank_based_types():
    prompt = check_adapter({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 20,
                            "token_dim": 32, "num_transformer_submodules": 1}, LLAMA)
    assert prompt.finding("not_rank_based").severity == "warning" and prompt.trainable_params == 20 * 32
    ia3 = check_adapter({"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                         "feedforward_modules": ["down_proj"]}, LLAMA)
    assert ia3.finding("not_rank_based").severity == "info"
    assert ia3.trainable_params == LAYERS * (16 + 16 + 64)
    wrong_dim = check_adapter({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "token_dim": 48}, LLAMA)
    assert "base_mismatch" in codes(wrong_dim, "error")
    wrong_layers = check_adapter({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "token_dim": 32,
                                  "num_layers": 24}, LLAMA)
    assert "base_mismatch" in codes(wrong_layers, "error")


def test_task_type_mismatch():
    assert "task_type_mismatch" in codes(check_adapter(lora(task_type="SEQ_CLS"), LLAMA), "warning")
    assert "task_type_mismatch" in codes(check_adapter(lora(task_type="NOT_A_TASK"), LLAMA))
    assert "task_type_mismatch" not in codes(check_adapter(lora(task_type="CAUSAL_LM"), LLAMA))
    t5 = T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, vocab_size=50)
    seq2seq_base = check_adapter(lora(target_modules=["q", "v"]), t5)
    assert "task_type_mismatch" in codes(seq2seq_base)


def test_seq_cls_adapter_is_checked_on_the_classification_model():
    check = check_adapter(lora(task_type="SEQ_CLS", modules_to_save=["score"], target_modules="all-linear"), LLAMA)
    assert "score" not in check.matched_modules and len(check.matched_modules) == 7 * LAYERS


def test_base_mismatch_by_name(base_dir):
    check = check_adapter(lora(base_model_name_or_path="Qwen/Qwen2-0.5B"), base_dir)
    finding = check.finding("base_mismatch")
    assert finding.severity == "warning" and "Qwen/Qwen2-0.5B" in finding.message
    same = check_adapter(lora(base_model_name_or_path="/somewhere/else/tiny-llama"), base_dir)
    assert "base_mismatch" not in codes(same)
    unnamed = check_adapter(lora(), base_dir)
    assert "base_unnamed" in codes(unnamed) and "base_mismatch" not in codes(unnamed)


def test_base_unknown():
    check = check_adapter(lora(base_model_name_or_path="nobody/not-cached-model-xyz"))
    assert check.finding("base_unknown").severity == "warning"
    assert check.matched_modules == [] and check.compatible
    assert check.trainable_params is None


def test_base_with_custom_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "my_custom_arch", "hidden_size": 8}))
    check = check_adapter(lora(), tmp_path)
    assert "base_unknown" in codes(check, "warning") and "my_custom_arch" in check.finding("base_unknown").message


def test_base_named_by_adapter_is_used_when_local(base_dir):
    check = check_adapter(lora(base_model_name_or_path=str(base_dir)))
    assert "base_from_adapter" in codes(check) and len(check.matched_modules) == 2 * LAYERS


def test_base_modifying_initialisation():
    check = check_adapter(lora(init_lora_weights="pissa_niter_4"), LLAMA)
    assert "base_modified_init" in codes(check, "warning")


# --- version quirks and adapter types in raw configs ---------------------------------------------

def test_peft_02_config_with_legacy_keys():
    old = {"base_model_name_or_path": "decapoda-research/llama-7b-hf", "bias": "none", "enable_lora": None,
           "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 16, "lora_dropout": 0.05,
           "merge_weights": False, "modules_to_save": None, "peft_type": "LORA", "r": 8,
           "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    check = check_adapter(old, LLAMA)
    assert "legacy_keys" in codes(check, "info")
    assert "enable_lora" in check.finding("legacy_keys").message
    assert check.scale == 2.0 and check.compatible and not check.rslora and not check.dora


def test_unknown_new_keys_are_ignored():
    plain = check_adapter(lora(), LLAMA)
    future = check_adapter(lora(shiny_new_option={"a": [1, 2]}, peft_version="9.9.9"), LLAMA)
    assert future.to_dict() == plain.to_dict()


def test_old_configs_without_alpha_use_peft_defaults():
    check = check_adapter({"peft_type": "LORA", "target_modules": ["q_proj"]}, LLAMA)
    assert check.r == 8 and check.alpha == 8 and check.scale == 1.0


def test_peft_type_spelling_and_absence():
    lower = check_adapter(lora(peft_type="lora"), LLAMA)
    assert lower.peft_type == "LORA" and lower.finding("config_invalid").severity == "warning"
    missing = lora()
    del missing["peft_type"]
    absent = check_adapter(missing, LLAMA)
    assert absent.finding("config_invalid").severity == "error" and absent.scale == 2.0
    unknown = check_adapter(lora(peft_type="FANCY_NEW"), LLAMA)
    assert "peft_type_unknown" in codes(unknown) and len(unknown.matched_modules) == 2 * LAYERS


@pytest.mark.parametrize("bad", [{"r": "8"}, {"r": 0}, {"r": True}, {"lora_alpha": "big"},
                                 {"target_modules": 3}, {"target_modules": "(unclosed"},
                                 {"target_modules": ".*q_proj", "layers_to_transform": [0]},
                                 {"layers_pattern": "layers"}, {"bias": "some"},
                                 {"rank_pattern": {"q_proj": -1}}, {"layers_to_transform": "all"}])
def test_invalid_values_are_errors_not_crashes(bad):
    check = check_adapter(lora(**bad), LLAMA)
    assert "config_invalid" in codes(check, "error") and check.exit_code == 1


def test_loha_lokr_vera_raw_configs():
    loha = check_adapter({"peft_type": "LOHA", "r": 4, "alpha": 32, "target_modules": ["q_proj"]}, LLAMA)
    assert loha.scale == 8.0 and "scaling_high" in codes(loha)
    assert loha.trainable_params == LAYERS * 2 * 4 * (32 + 32)
    lokr = check_adapter({"peft_type": "LOKR", "r": 8, "alpha": 8, "target_modules": ["q_proj"]}, LLAMA)
    # 32 = 4 * 8 both ways: w1 (4, 4), w2 (8, 8) since r=8 >= max(8, 8)/2
    assert lokr.trainable_params == LAYERS * (16 + 64)
    vera = check_adapter({"peft_type": "VERA", "r": 4, "target_modules": ["q_proj"]}, LLAMA)
    assert vera.r == 4 and vera.trainable_params == LAYERS * (32 + 4)


# --- evidence ------------------------------------------------------------------------------------

def test_evidence_table_is_package_data_with_provenance():
    rows = load_forgetting_evidence()
    assert len(rows) == 8
    assert all(r["provenance"] and r["source_arxiv"] == "2405.09673" for r in rows)
    assert (Path(__import__("profiler").__file__).parent / "data" / "forgetting_evidence.md").is_file()


def test_evidence_near_rank_64():
    ev = forgetting_evidence(64)
    assert ev["applicable"]
    # within a factor of 4 of 64: the r=64 Magicoder row, and r=256 rows (256/64 = 4)
    gaps = {g["setup"]: g["gap_pp"] for g in ev["gaps"]}
    assert gaps["Llama-2-7B instruction fine-tuning on Magicoder-Evol-Instruct (code)"] == 9.5
    assert gaps["Llama-2-7B continued pretraining on StarCoder-Python (code)"] == 7.2
    assert gaps["Llama-2-7B continued pretraining on OpenWebMath (math)"] == 0.3
    assert gaps["Llama-2-7B instruction fine-tuning on MetaMathQA (math)"] == 0.8
    assert ev["gaps"][0]["lora_rank"] == 64                   # nearest first
    assert "0.509 vs full FT 0.414 = 9.5 pp less forgetting" in ev["gaps"][0]["statement"]
    assert all(r["provenance"] for r in ev["rows"]) and len(ev["rows"]) == 8


def test_evidence_rank_16_only_magicoder_and_rank_8_none():
    ev16 = forgetting_evidence(16)
    assert [g["lora_rank"] for g in ev16["gaps"]] == [64]
    ev8 = forgetting_evidence(8)
    assert ev8["gaps"] == [] and ev8["rows"] == []
    assert ev8["message"].startswith("No published row is near r=8")
    assert ev8["nearest_rank"] == 64
    assert forgetting_evidence(1024)["gaps"] and not forgetting_evidence(1025)["gaps"]


def test_evidence_never_gives_a_number_for_the_adapter():
    check = check_adapter(lora(r=64, lora_alpha=128), LLAMA)
    ev = check.evidence
    assert set(ev) == {"applicable", "rank", "near_rule", "table_ranks", "rows", "gaps", "caveat", "message"}
    table_values = {float(r["value"]) for r in load_forgetting_evidence()}
    for gap in ev["gaps"]:
        assert gap["lora_value"] in table_values and gap["full_ft_value"] in table_values
    text = format_report(check)
    assert "9.5 pp less forgetting" in text and "provenance: as compiled in TAF Agent" in text
    assert "not a prediction for this adapter" in text and "no change versus the base" in text


# --- the CLI entry and unreadable input ------------------------------------------------------------

def run(adapter, base=None, as_json=False):
    out, err = io.StringIO(), io.StringIO()
    code = run_check_adapter(adapter, base, as_json=as_json, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def one_line_error(err: str) -> bool:
    return err.startswith("attnprof: error: ") and err.endswith("\n") and err.count("\n") == 1


def test_cli_unreadable_inputs(tmp_path, base_dir, peft_adapters):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "empty").mkdir()
    good = tmp_path / "adapter_config.json"
    good.write_text(json.dumps(lora()))
    for adapter, base in [(tmp_path / "missing.json", None), (tmp_path / "broken.json", None),
                          (tmp_path / "list.json", None), (tmp_path / "empty", None),
                          (good, tmp_path / "no-such-base"), (good, peft_adapters["lora"][0]),
                          (good, tmp_path / "broken.json")]:
        code, out, err = run(adapter, base)
        assert code == 2 and out == "" and one_line_error(err), (adapter, base, err)


def test_cli_exit_codes_and_text(tmp_path, base_dir):
    good = tmp_path / "good" / "adapter_config.json"
    good.parent.mkdir()
    good.write_text(json.dumps(lora()))
    code, out, err = run(good.parent, base_dir)
    assert code == 0 and err == "" and "result: compatible" in out and "scale=2 (alpha/r)" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(lora(target_modules=["c_attn"])))
    code, out, _ = run(bad, base_dir, as_json=True)
    data = json.loads(out)
    assert code == 1 and data["compatible"] is False
    assert {"compatible", "scale", "trainable_params", "findings", "evidence"} <= set(data)
    assert any(f["code"] == "targets_missing" and f["severity"] == "error" for f in data["findings"])


def test_base_as_bare_config_json(tmp_path):
    tiny("gpt2").save_pretrained(str(tmp_path))
    check = check_adapter(lora(target_modules=["c_attn", "c_proj"]), tmp_path / "config.json")
    assert len(check.matched_modules) == 3 * LAYERS           # attn.c_attn, attn.c_proj, mlp.c_proj


def test_load_adapter_config_forms(tmp_path, monkeypatch):
    import huggingface_hub.constants
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(lora(r=4)))
    assert load_adapter_config(tmp_path / "a")["r"] == 4
    assert load_adapter_config(tmp_path / "a" / "adapter_config.json")["r"] == 4
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-lora" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "adapter_config.json").write_text(json.dumps(lora(r=32)))
    (cache / "models--acme--tiny-lora" / "refs").mkdir()
    (cache / "models--acme--tiny-lora" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert load_adapter_config("acme/tiny-lora")["r"] == 32
    with pytest.raises(AttnprofError, match="not in the local Hugging Face cache"):
        load_adapter_config("acme/other-lora")


def test_result_views():
    check = check_adapter(lora(r=8, lora_alpha=64), LLAMA)
    frame = check.to_frame()
    assert list(frame.columns) == ["severity", "code", "message"] and len(frame) == len(check.findings)
    assert "scaling_high" in check._repr_html_()
    assert isinstance(check.findings[0], Finding)
    assert json.loads(check.to_json())["scale"] == 8.0


# --- robustness: arbitrary JSON never crashes the checker -------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
NAMES = st.lists(st.sampled_from(LEAVES) | st.text(max_size=8), max_size=4)
FIELD_VALUES = {
    "peft_type": st.sampled_from(["LORA", "ADALORA", "LOHA", "LOKR", "IA3", "VERA", "PROMPT_TUNING",
                                  "PREFIX_TUNING", "P_TUNING", "OFT", "lora", "???"]),
    "r": st.integers(-2, 300), "lora_alpha": st.floats(-10, 1e4) | st.integers(0, 512),
    "alpha": st.integers(0, 64), "init_r": st.integers(0, 16), "target_r": st.integers(0, 16),
    "target_modules": NAMES | st.sampled_from(["all-linear", ".*proj", "(", "q_proj"]),
    "modules_to_save": NAMES, "exclude_modules": NAMES, "feedforward_modules": NAMES,
    "layers_to_transform": st.integers(-1, 5) | st.lists(st.integers(-1, 5), max_size=3),
    "layers_pattern": st.sampled_from(["layers", "h", "(", ""]) | NAMES,
    "rank_pattern": st.dictionaries(st.sampled_from(LEAVES) | st.text(max_size=4),
                                    st.integers(-1, 16) | st.lists(st.booleans(), max_size=4), max_size=3),
    "alpha_pattern": st.dictionaries(st.sampled_from(LEAVES) | st.text(max_size=4), st.integers(-1, 64), max_size=3),
    "use_rslora": st.booleans() | JSON_VALUES, "use_dora": st.booleans() | JSON_VALUES,
    "bias": st.sampled_from(["none", "all", "lora_only", "x"]), "lora_bias": st.booleans(),
    "task_type": st.sampled_from(["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "FOO"]) | JSON_VALUES,
    "num_virtual_tokens": st.integers(-1, 50), "token_dim": st.integers(-1, 64), "num_layers": st.integers(-1, 8),
    "prefix_projection": st.booleans(), "encoder_reparameterization_type": st.sampled_from(["MLP", "LSTM"]),
    "decompose_both": st.booleans(), "decompose_factor": st.integers(-2, 8),
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "olora"]),
    "enable_lora": JSON_VALUES, "merge_weights": st.booleans(),
}
CONFIGS = st.fixed_dictionaries({}, optional={k: v | JSON_VALUES for k, v in FIELD_VALUES.items()})


def assert_well_formed(check: AdapterCheck) -> None:
    assert isinstance(check, AdapterCheck)
    for f in check.findings:
        assert f.code in FINDING_CODES and f.severity in ("error", "warning", "info") and f.message
    assert check.compatible == (not any(f.severity == "error" for f in check.findings))
    json.loads(check.to_json())
    format_report(check)


@settings(max_examples=150, deadline=None)
@given(raw=CONFIGS)
def test_random_configs_give_findings_never_crashes(raw):
    assert_well_formed(check_adapter(raw, LLAMA))
    assert_well_formed(check_adapter(raw, tiny("gpt2")))


@settings(max_examples=40, deadline=None)
@given(raw=st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=6))
def test_random_dicts_without_base(raw):
    raw.pop("base_model_name_or_path", None)
    assert_well_formed(check_adapter(raw))


@settings(max_examples=60, deadline=None)
@given(content=JSON_VALUES.map(json.dumps) | st.text(max_size=40)
       | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_random_files_exit_0_1_or_2_with_one_line(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter_config.json"
        path.write_text(content, encoding="utf-8")
        code, out, err = run(path, LLAMA)
        try:
            is_object = isinstance(json.loads(content), dict)
        except ValueError:
            is_object = False
        if is_object:
            assert code in (0, 1) and err == "" and out.startswith("attnprof check-adapter")
        else:
            assert code == 2 and out == "" and one_line_error(err)
