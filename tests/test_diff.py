"""Base vs merged on tiny models: identity, gate, mismatches, pipeline helpers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_tiny, tiny_tokenizer
from profiler import AttnprofError, assert_profile_close, diff_profiles, load_diff, load_profile
from profiler.cli import main
from profiler.diff import HeadDiff, gate, js_divergence, verdict_uncertainty
from profiler.rules import GateThresholds

FAST = ["--length", "128", "--num", "4", "--probes", "random", "--no-report", "--quiet"]


def sharpened_copy(src, dst, factor=3.0):
    """A copy of a tiny model whose q_proj weights are scaled: sharper attention, known to move."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("q_proj.weight"):
                p.mul_(factor)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def test_base_vs_exact_copy_is_exactly_zero(tiny_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    out = tmp_path / "run"
    code = main([str(a) for a in ["profile", tiny_dir, "vs", copy, "--out", out, "--json", *FAST]])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["verdict"] == "pass"
    assert all(h["dgamma"] == 0.0 and h["dgamma_ci"] == [0.0, 0.0] for h in data["heads"])
    assert data["model_dgamma"] == 0.0 and data["shifted_heads"] == 0 and data["regime_flips"] == 0
    assert (out / "base/profile.json").is_file() and (out / "merged/curves.npz").is_file()
    assert load_diff(out).verdict == "pass"
    assert "PASS" in (out / "summary.md").read_text()          # written even with --no-report


def test_sharpened_model_fails_the_gate(tiny_dir, tmp_path, capsys):
    sharp = sharpened_copy(tiny_dir, tmp_path / "sharp")
    code = main([str(a) for a in ["profile", tiny_dir, "vs", sharp, "--out", tmp_path / "r", "--json",
                                  "--no-weights", *FAST]])
    data = json.loads(capsys.readouterr().out)
    assert code == 1 and data["verdict"] == "regression"
    assert data["shifted_heads"] > 0 and data["reasons"] != ["all within thresholds"]
    base, merged = load_profile(tmp_path / "r/base"), load_profile(tmp_path / "r/merged")
    with pytest.raises(AssertionError, match="attention profile regression"):
        assert_profile_close(base, merged)
    assert diff_profiles(base, merged, GateThresholds(10, 1, 1)).verdict == "pass"   # loose gate passes
    with pytest.raises(AttnprofError, match="max_model_dgamma"):       # a NaN gate would always pass
        assert_profile_close(base, merged, max_model_dgamma=float("nan"))


def test_paired_ci_uses_the_same_probe_resamples(tiny_dir, tmp_path, capsys):
    """A profile diffed with itself has zero-width CIs only if both sides share the resamples."""
    main([str(a) for a in ["profile", tiny_dir, "--out", tmp_path / "p", "--no-weights", *FAST]])
    p = load_profile(tmp_path / "p")
    d = diff_profiles(p, p)
    assert all(h.dgamma_ci == (0.0, 0.0) for h in d.heads)


def test_gate_thresholds_and_reasons():
    t = GateThresholds()
    assert gate(0.04, 0.05, 0.05, t).verdict == "pass"
    v = gate(-0.06, 0.2, 0.0, t)
    assert v.verdict == "regression" and v.exit_code == 1 and len(v.reasons) == 2


def test_js_divergence_bounds():
    p = np.array([1.0, 0.0]); q = np.array([0.0, 1.0])
    assert js_divergence(p, q) == pytest.approx(1.0)
    assert js_divergence(p, p) == pytest.approx(0.0)


def one_error(code, err):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnprof: error:"), err
    return lines[0]


def test_different_architectures_are_refused(tiny_dir, tmp_path, capsys):
    qwen = save_tiny(tmp_path / "qwen", kind="qwen2", num_key_value_heads=2)
    line = one_error(main([str(a) for a in ["profile", tiny_dir, "vs", qwen, *FAST]]), capsys.readouterr().err)
    assert "different architectures" in line


def test_different_head_counts_are_refused(tiny_dir, tmp_path, capsys):
    other = save_tiny(tmp_path / "other", num_attention_heads=8, num_key_value_heads=2)
    line = one_error(main([str(a) for a in ["profile", tiny_dir, "vs", other, *FAST]]), capsys.readouterr().err)
    assert "different head counts" in line


def test_tokenizer_disagreement_is_refused(tiny_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    base_tok = tiny_tokenizer(300)
    vocab = {t: i for i, t in enumerate(sorted(base_tok.get_vocab(), key=base_tok.get_vocab().get))}
    raw = Tokenizer(models.WordLevel(vocab={k: (v * 7) % len(vocab) for k, v in vocab.items()},
                                     unk_token="<eos>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other_tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    text = tmp_path / "p.txt"
    text.write_text("attention decays with distance in many heads of a language model. " * 60)
    other = save_tiny(tmp_path / "other", num_key_value_heads=2, tokenizer=other_tok)
    capsys.readouterr()                                # the set-up's own progress output
    for probes, reason in ((f"file:{text}", "tokenises differently"), ("random", "random-id probes mean different text")):
        line = one_error(main([str(a) for a in ["profile", tiny_dir, "vs", other, "--probes", probes,
                                                "--length", "64", "--num", "4", "--no-report", "--quiet"]]),
                         capsys.readouterr().err)
        assert "tokenizers disagree" in line and reason in line      # random ids: checked by vocabulary

    # a renamed special token (random probes never draw special ids) is no disagreement
    renamed = tiny_tokenizer(300, eos="<|im_end|>")
    assert renamed.convert_ids_to_tokens(0) == "<|im_end|>" and base_tok.convert_ids_to_tokens(0) == "<eos>"
    assert [t for t in renamed.get_vocab() if t not in base_tok.get_vocab()] == ["<|im_end|>"]
    chat = save_tiny(tmp_path / "chat", num_key_value_heads=2, tokenizer=renamed)
    code = main([str(a) for a in ["profile", tiny_dir, "vs", chat, "--probes", "random", "--length", "64",
                                  "--num", "4", "--no-report", "--quiet", "--no-weights", "--out", tmp_path / "c"]])
    assert code == 0                           # same weights (seed 0), same ids: nothing moved


def test_adapter_merged_with_peft(tiny_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)                 # B = 0 at init: merging changes nothing
    code = main([str(a) for a in ["profile", tiny_dir, "vs", adapter, "--out", tmp_path / "r", "--json",
                                  "--no-weights", *FAST]])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["model_dgamma"] == 0.0
    assert data["adapter"]["config"]["r"] == 4 and data["adapter"]["check"]["compatible"] is True


def test_adapter_run_with_weight_diff_is_byte_identical(tiny_dir, tmp_path, capsys):
    """BASE vs ADAPTER merges into a temporary directory for the weight diff; diff.json must not
    depend on where that was."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    for name in ("a", "b"):
        code = main([str(a) for a in ["profile", tiny_dir, "vs", adapter, "--out", tmp_path / name, *FAST]])
        assert code == 0
    first = (tmp_path / "a/diff.json").read_bytes()
    assert first == (tmp_path / "b/diff.json").read_bytes()
    merged = json.loads(first)["weights_summary"]["merged"]
    assert str(adapter) in merged and "merged onto" in merged


def test_api_compare_with_an_adapter_diffs_the_weights(tiny_dir, tmp_path):
    """compare(BASE, ADAPTER) from Python merges into a temporary directory for the weight diff,
    as the CLI does, and removes it; the diff finds the adapter's rank on its targets."""
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import profiler
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    before = set(Path(tempfile.gettempdir()).glob("attnprof-merge-*"))
    result = profiler.compare(str(tiny_dir), str(tmp_path / "adapter"), length=64, num=4, probes="random")
    assert result.merged_dir is None and set(Path(tempfile.gettempdir()).glob("attnprof-merge-*")) == before
    changed = [t for t in result.diff.weights if t["changed"]]
    assert {t["name"].split(".")[-2] for t in changed} == {"q_proj"} and len(changed) == 2
    assert all(t["signal_rank"] == 4 for t in changed)
    assert not [f for f in result.diff.flags if f["code"] == "weights_not_diffed"]


def test_adapter_for_another_base_is_refused(tiny_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    wide = save_tiny(tmp_path / "wide", hidden_size=128, num_key_value_heads=2)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(wide),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "nonexistent_proj"]))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["nonexistent_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    line = one_error(main([str(a) for a in ["profile", tiny_dir, "vs", adapter, *FAST]]), capsys.readouterr().err)
    assert "does not fit" in line


def test_trainer_callback_stops_a_run_that_breaks_attention(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from profiler.callback import AttentionProfileCallback, ProfileGateConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = tiny_tokenizer(300)
    ids = torch.randint(1, 299, (64, 32))
    data = [{"input_ids": r, "labels": r} for r in ids]
    callback = AttentionProfileCallback(tokenizer, ProfileGateConfig(every_steps=2, length=64, num=3))
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=20, per_device_train_batch_size=4,
                             learning_rate=0.5, report_to=[], save_strategy="no", logging_steps=100,
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    with pytest.warns(UserWarning, match="attention profile regression at step"):
        trainer.train()                                           # returns normally, as Trainer does
    assert callback.history, "the callback never profiled"
    assert callback.history[-1][1].verdict == "regression" and callback.regressed
    assert callback.stopped_at == trainer.state.global_step < 20  # training was stopped early
    assert model.config._attn_implementation != "attnprof"          # the model was restored
    with pytest.raises(AttnprofError, match="every_steps"):
        ProfileGateConfig(every_steps=0)


def test_profiling_a_model_object_leaves_it_and_the_process_as_they_were(tiny_dir, monkeypatch):
    """profile(model, tokenizer) from a notebook or a training script: every module's train/eval
    mode, the attention implementation, the environment and transformers' log level come back;
    loading options, which cannot apply to a model object, are refused rather than ignored."""
    import os

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import profiler
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    verbosity = hf_logging.get_verbosity()
    p = profiler.profile(model, tiny_tokenizer(300), length=64, num=4, probes="random")
    assert p.model["dtype"] == "float32" and len(p.heads) == 8
    assert [m.training for m in model.modules()] == modes and not model.model.layers[0].training
    assert model.config._attn_implementation != "attnprof"
    assert "HF_HUB_OFFLINE" not in os.environ and hf_logging.get_verbosity() == verbosity
    with pytest.raises(AttnprofError, match="device, dtype: loading options"):
        profiler.profile(model, tiny_tokenizer(300), length=64, num=4, device="cuda", dtype="bfloat16")


def test_quantisation_alone_recipe_loads_merged_in_4bit(tiny_dir, tmp_path, capsys):
    """`profile M vs M --merged-load-in-4bit`: bitsandbytes NF4 on the merged side only."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q"
    code = main([str(a) for a in ["profile", tiny_dir, "vs", tiny_dir, "--merged-load-in-4bit", "--out", out,
                                  "--json", "--no-weights", "--device", "cpu", *FAST]])
    data = json.loads(capsys.readouterr().out)
    assert code in (0, 1) and data["verdict"] in ("pass", "regression")
    base = json.loads((out / "base/profile.json").read_text())["model"]
    merged = json.loads((out / "merged/profile.json").read_text())["model"]
    assert base["quantization"] is None and merged["quantization"] == "nf4"
    assert any(h["dgamma"] != 0.0 for h in data["heads"])          # quantisation moved something


def test_adapter_merged_into_a_4bit_base(tiny_dir, tmp_path, capsys):
    """`profile BASE vs ADAPTER --merged-load-in-4bit`: the adapter is merged into an NF4 base (QLoRA
    deployment), not silently into a full-precision one."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    out = tmp_path / "q"
    code = main([str(a) for a in ["profile", tiny_dir, "vs", adapter, "--merged-load-in-4bit", "--out", out,
                                  "--device", "cpu", *FAST]])
    assert code in (0, 1)
    assert json.loads((out / "base/profile.json").read_text())["model"]["quantization"] is None
    assert json.loads((out / "merged/profile.json").read_text())["model"]["quantization"] == "nf4"
    flags = json.loads((out / "diff.json").read_text())["flags"]
    # NF4 codes against fp32 floats would flag a clean LoRA everywhere: the weight diff says why it is absent
    assert [f["code"] for f in flags] == ["weights_not_diffed"] and "4-/8-bit base" in flags[0]["message"]


def _head(ci: tuple[float, float], dgamma: float) -> HeadDiff:
    """A HeadDiff with a given paired CI, shifted by the rule of diff_profiles."""
    shifted = (ci[0] > 0 or ci[1] < 0) and abs(dgamma) >= 0.05
    return HeadDiff(0, 0, 1.0, 1.0 + dgamma, dgamma, ci, 0.0, 0.0, shifted, "critical", "critical")


def test_verdict_uncertainty_reads_the_ci_ends():
    """Hand-built CIs: the count of shifted heads at the CIs' ends, and whether the gate's decision
    there differs (borderline) — for the shifted-heads and the model-level thresholds."""
    gate = GateThresholds()                                              # 0.05, 10 %, 10 %
    still = [_head((-0.01, 0.01), 0.0)] * 16
    sure, reaching_in, maybe = _head((0.06, 0.09), 0.07), _head((0.01, 0.09), 0.06), _head((0.01, 0.07), 0.04)
    heads = [sure, reaching_in, reaching_in, maybe] + still                # 3 of 20 shifted: 15 % > 10 %
    assert sum(h.shifted for h in heads) == 3
    assert verdict_uncertainty(heads, (-0.01, 0.01), 0.0, gate) == ((1, 4), True)      # 5 % … 20 %
    firm = [sure] * 10 + still[:10]                                        # 50 % beyond doubt
    assert verdict_uncertainty(firm, (-0.01, 0.01), 0.0, gate) == ((10, 10), False)
    assert verdict_uncertainty(still, (-0.01, 0.01), 0.0, gate) == ((0, 0), False)   # a firm pass
    assert verdict_uncertainty(still, (0.03, 0.08), 0.0, gate) == ((0, 0), True)     # model CI straddles 0.05
    assert verdict_uncertainty(still, (0.03, 0.08), 0.5, gate) == ((0, 0), False)    # flips decide anyway


def test_compare_takes_option_fields_as_keywords(tiny_dir):
    """As the README's API block shows: compare(BASE, MERGED, length=..., num=...)."""
    import profiler
    from profiler.run import ProfileOptions
    result = profiler.compare(str(tiny_dir), str(tiny_dir), length=64, num=4, probes="random", with_weights=False)
    assert result.base.probes["length"] == 64 and result.base.curves.A.shape[0] == 4
    assert result.diff.verdict == "pass" and result.diff.model_dgamma == 0.0     # a model against itself
    with pytest.raises(AttnprofError, match="not both"):
        profiler.compare(str(tiny_dir), str(tiny_dir), ProfileOptions(), num=4)


def test_quiet_api_calls_hide_the_gguf_conversion_bar(capfd):
    """quiet=True in the API: transformers' GGUF conversion bar (plain tqdm, which its own
    progress-bar switch does not reach) draws nothing during the call and is as before after it."""
    import importlib

    from profiler.run import GGUF_BAR_MODULE, quieted
    gguf_utils = importlib.import_module(GGUF_BAR_MODULE)
    before = gguf_utils.tqdm
    capfd.readouterr()
    with quieted(True):
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert "Converting" not in capfd.readouterr().err
    assert gguf_utils.tqdm is before
    with quieted(False):
        assert gguf_utils.tqdm is before


def test_stage_modules_are_reachable_from_the_package():
    """README writes profiler.run.write_run(...) and profiler.plots.*: in a fresh process, after a
    bare `import profiler`, both must resolve (the package imports its modules lazily)."""
    import subprocess
    import sys
    script = "import profiler; print(profiler.run.write_run.__name__, profiler.plots.plot_regime_maps.__name__)"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["write_run", "plot_regime_maps"], proc.stderr


def test_jupyter_views_show_reasons_intervals_and_single_row_tables():
    """What decides a verdict must be visible in its notebook view; a result whose table has one
    row (an adapter check with one finding) still shows it."""
    from dataclasses import dataclass

    from profiler.diff import Verdict
    from profiler.results import Result
    verdict = Verdict("regression", ["|model Δgamma| 0.08 > 0.05", "shifted heads 12% > 10%"], {"max_model_dgamma": 0.05})
    view = verdict._repr_html_()
    assert "|model Δgamma| 0.08 &gt; 0.05; shifted heads 12% &gt; 10%" in view
    assert list(verdict.to_frame().columns) == ["verdict", "reasons"]

    @dataclass
    class OneFinding(Result):
        name: str

        def rows(self):
            return [{"code": "targets_attention_only", "severity": "info"}]

    assert "targets_attention_only" in OneFinding("x")._repr_html_()
