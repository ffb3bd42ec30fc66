"""The CLI on tiny models: outputs, determinism, and one-line exit-2 errors on bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import int8_beside_full, save_tiny
from profiler.cli import main
from profiler.rules import REGIMES

FAST = ["--length", "128", "--num", "3", "--probes", "random", "--no-report", "--quiet", "--no-weights"]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_profile_writes_a_complete_run(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["profile", tiny_dir, "--out", out, "--json", *FAST], capsys)
    assert code == 0
    data = json.loads(stdout)
    assert json.loads((out / "profile.json").read_text()) == data
    assert set(data) >= {"model", "probes", "heads", "model_level", "versions", "fit"}
    assert data["model"]["num_layers"] == 2 and data["model"]["num_kv_heads"] == 2
    assert len(data["heads"]) == 2 * 4
    assert {h["regime"] for h in data["heads"]} <= set(REGIMES)
    window = data["probes"]["window"]
    with np.load(out / "curves.npz") as z:
        assert z["A"].shape == (3, 2, 4, 128 - window + 1)
    with np.load(out / "probes.npz") as z:
        assert z["input_ids"].shape == (3, 128)
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "single" and "profile.json" in run["files"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temp dirs left


def test_same_inputs_give_byte_identical_json(tiny_dir, tmp_path, capsys):
    for name in ("a", "b"):
        assert run_cli(["profile", tiny_dir, "--out", tmp_path / name, *FAST], capsys)[0] == 0
    assert (tmp_path / "a/profile.json").read_bytes() == (tmp_path / "b/profile.json").read_bytes()
    assert run_cli(["profile", tiny_dir, "--out", tmp_path / "c", *FAST, "--seed", "1"], capsys)[0] == 0
    assert (tmp_path / "a/profile.json").read_bytes() != (tmp_path / "c/profile.json").read_bytes()


def test_device_map_gives_the_same_profile(tiny_dir, tmp_path, capsys):
    """`--device-map auto` hands placement to accelerate; on a CPU-only machine every layer lands on
    the CPU and the profile must not change by a byte (hooked layers: test_capture.py)."""
    assert run_cli(["profile", tiny_dir, "--out", tmp_path / "plain", "--device", "cpu", *FAST], capsys)[0] == 0
    assert run_cli(["profile", tiny_dir, "--out", tmp_path / "mapped", "--device", "cpu", "--device-map", "auto",
                    *FAST], capsys)[0] == 0
    assert (tmp_path / "plain/profile.json").read_bytes() == (tmp_path / "mapped/profile.json").read_bytes()


def test_8bit_model_profiles_near_its_full_precision_self(tiny_dir, tmp_path, capsys):
    """`--load-in-8bit`: every projection of the decoder layers becomes a bitsandbytes LLM.int8
    layer; 8-bit rounding moves the attention profile a little, and only a little."""
    pytest.importorskip("bitsandbytes")
    code, stdout, _ = run_cli(["profile", tiny_dir, "--out", tmp_path / "q8", "--device", "cpu",
                               "--load-in-8bit", "--json", *FAST], capsys)
    assert code == 0 and json.loads(stdout)["model"]["quantization"] == "int8"
    int8, full, layers = int8_beside_full(tiny_dir, "cpu")
    assert len(layers) == 2 * 7 and all(m.weight.dtype == torch.int8 for m in layers)  # q k v o gate up down
    error = np.abs(int8 - full).max()
    assert 0 < error < 0.05 * np.abs(full).max(), error


def one_error_line(code, err):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("attnprof: error: "), err
    return lines[0]


def test_softcapped_model_is_profiled_from_eager_weights(tmp_path, capsys):
    """Gemma 2 softcaps its logits, which SDPA refuses: the run says it reads eager weights
    instead and records it; the dense estimator is refused in one line."""
    model = save_tiny(tmp_path / "gemma2", "gemma2", attn_implementation="eager")
    code, _, err = run_cli(["profile", model, "--out", tmp_path / "r", *FAST], capsys)
    assert code == 0, err
    assert "attnprof: warning: Gemma2Attention uses attention logit softcapping" in err
    assert json.loads((tmp_path / "r" / "profile.json").read_text())["probes"]["capture"] == "eager weights"
    from profiler import load_profile
    assert load_profile(tmp_path / "r").curves.path == "hooks"
    code, _, err = run_cli(["profile", model, "--out", tmp_path / "d", "--estimator", "dense", *FAST], capsys)
    errors = [line for line in err.splitlines() if line.startswith("attnprof: error:")]
    assert code == 2 and len(errors) == 1 and errors[0].endswith("use --estimator tail"), err


def test_model_that_computes_its_own_attention_loads_eager(tmp_path, capsys):
    """Falcon's classes refuse any attention name but their own at load: the model is loaded with
    eager attention and read through hooks; a Falcon object already loaded with SDPA cannot switch
    and is refused in one line that says how to load it."""
    import transformers

    from conftest import tiny_tokenizer
    from profiler import profile
    from profiler.errors import AttnprofError
    config = transformers.FalconConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       new_decoder_architecture=True, num_kv_heads=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "falcon")
    tiny_tokenizer(300).save_pretrained(tmp_path / "falcon")
    code, _, err = run_cli(["profile", tmp_path / "falcon", "--out", tmp_path / "r", *FAST], capsys)
    assert code == 0 and "reads eager attention weights" in err, err
    assert json.loads((tmp_path / "r" / "profile.json").read_text())["probes"]["capture"] == "eager weights"
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(AttnprofError, match="load it with attn_implementation='eager'"):
        profile(model, tiny_tokenizer(300), length=64, num=4, probes="random")


def test_missing_path(tmp_path, capsys):
    line = one_error_line(*run_cli(["profile", tmp_path / "nope", *FAST], capsys)[::2])
    assert "no such file" in line


def test_not_a_causal_lm(tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM
    d = tmp_path / "bert"
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, architectures=["BertForMaskedLM"])
    BertForMaskedLM(cfg).save_pretrained(d)
    line = one_error_line(*run_cli(["profile", d, *FAST], capsys)[::2])
    assert "not a causal LM" in line


@pytest.mark.parametrize("damage", ["truncated", "garbage-header"])
def test_corrupt_safetensors(tiny_dir, tmp_path, capsys, damage):
    d = tmp_path / "broken"
    shutil.copytree(tiny_dir, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + b"not json" + data[16:])
    line = one_error_line(*run_cli(["profile", d, *FAST], capsys)[::2])
    assert "model.safetensors" in line and "corrupt" in line


def test_checkpoint_missing_weights_is_refused(tiny_dir, tmp_path, capsys):
    """A checkpoint that lacks some of the model's weights is not the model: transformers would fill
    them with random values and the profile would change from run to run."""
    from safetensors.torch import load_file, save_file
    d = tmp_path / "partial"
    shutil.copytree(tiny_dir, d)
    tensors = load_file(d / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layers.1." not in k}, d / "model.safetensors",
              metadata={"format": "pt"})
    line = one_error_line(*run_cli(["profile", d, *FAST], capsys)[::2])
    assert "weight(s) missing from the checkpoint (model.layers.1." in line


def test_nan_in_attention(tmp_path, capsys):
    """A checkpoint whose layer-1 query weights hold a NaN: one line naming the layer, exit 2,
    and no run directory left behind."""
    from safetensors.torch import load_file, save_file
    d = save_tiny(tmp_path / "nan")
    weights = load_file(d / "model.safetensors")
    weights["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()                                         # the save's progress bar
    out = tmp_path / "run"
    line = one_error_line(*run_cli(["profile", d, "--out", out, *FAST, "--num", "8"], capsys)[::2])
    assert "NaN or inf in the attention of layer 1" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_length_above_max_positions(tiny_dir, tmp_path, capsys):
    args = ["profile", tiny_dir, "--length", "2048", "--num", "1", "--probes", "random", "--no-report",
            "--quiet", "--out", tmp_path / "r"]
    line = one_error_line(*run_cli(args, capsys)[::2])
    assert "max positions (1024)" in line and "--allow-truncate" in line
    code, _, err = run_cli(args + ["--allow-truncate"], capsys)
    assert code == 0 and "truncated to the model's max positions" in err
    assert json.loads((tmp_path / "r/profile.json").read_text())["probes"]["length"] == 1024


def test_empty_probe_file(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    line = one_error_line(*run_cli(["profile", tiny_dir, "--probes", f"file:{empty}", "--length", "64",
                                    "--num", "1", "--no-report"], capsys)[::2])
    assert "empty" in line


def test_file_and_jsonl_probes(tiny_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("low rank adapters change a few directions of the weights. " * 40)
    lines = tmp_path / "t.jsonl"
    lines.write_text("\n".join(json.dumps({"text": "attention decays with distance. " * 10}) for _ in range(8)))
    for suite in (f"file:{text}", f"jsonl:{lines}:text", "repeat", "code:stdlib"):
        code, _, err = run_cli(["profile", tiny_dir, "--probes", suite, "--length", "64", "--num", "2",
                                "--no-report", "--quiet", "--out", tmp_path / "r"], capsys)
        assert code == 0, (suite, err)
    code, _, err = run_cli(["profile", tiny_dir, "--probes", f"jsonl:{lines}:missing", "--length", "64",
                            "--num", "1", "--no-report"], capsys)
    assert code == 2 and "no field 'missing'" in err


def test_usage_errors_are_one_line(capsys):
    line = one_error_line(*run_cli(["profile", "a", "b"], capsys)[::2])
    assert "BASE vs MERGED" in line
    line = one_error_line(*run_cli(["frobnicate"], capsys)[::2])
    assert "invalid choice" in line
    line = one_error_line(*run_cli(["profile", "a", "--load-in-4bit", "--load-in-8bit"], capsys)[::2])
    assert "not allowed with argument --load-in-4bit" in line
    line = one_error_line(*run_cli(["profile", "a", "vs", "b", "--load-in-8bit", "--merged-load-in-4bit"], capsys)[::2])
    assert "not allowed with argument --load-in-8bit" in line


@pytest.mark.parametrize("option,value", [("--max-model-dgamma", "nan"), ("--max-model-dgamma", "-1"),
                                          ("--max-shifted-heads", "10"), ("--max-regime-flips", "inf")])
def test_a_threshold_that_would_turn_the_gate_off_is_refused(capsys, option, value):
    """NaN is never exceeded and a fraction above 1 never can be (a gate that always passes); a
    negative value fails identical models. All refused before anything is loaded."""
    line = one_error_line(*run_cli(["profile", "a", "vs", "b", option, value], capsys)[::2])
    assert f"({option}) is" in line and "must be" in line


@pytest.mark.parametrize("options,message", [
    (["--window", "0"], "--window 0: the tail window must hold at least 1"),
    (["--window", "128"], "fewer than the probe length's 128 queries"),
    (["--window", "110"], "--window 110 at probe length 128 leaves the fit no distances"),
    (["--length", "1"], "--length 1: probes need at least 32 tokens"),
    (["--estimator", "taf", "--window", "10"], "--window does not apply to --estimator taf"),
    (["--seed", "-1"], "--seed -1: the seed must be ≥ 0"),
    (["vs", "SELF", "--targets", "q_projj,v_porj"], "target modules q_projj, v_porj name no weight"),
    (["vs", "SELF", "--adapter-rank", "0"], "--adapter-rank: 0: must be at least 1"),
    (["vs", "SELF", "--targets", "q_proj", "--no-weights"], "which --no-weights skips"),
])
def test_bad_options_are_refused_before_any_capture(tiny_dir, tmp_path, capsys, monkeypatch, options, message):
    """A window the fit cannot use (0 once became the default silently; near T it failed only
    after the whole capture), a negative seed, weight-diff options that match nothing or would go
    unused: one line naming the option, no model run."""
    from profiler import capture
    monkeypatch.setattr(capture, "capture", lambda *a, **k: pytest.fail("captured"))
    pair = ["vs", tiny_dir] if options[:2] == ["vs", "SELF"] else []
    args = ["profile", tiny_dir, *pair, "--out", tmp_path / "r", "--length", "128", "--num", "4",
            "--probes", "random", "--no-report", *options[len(pair):]]
    assert message in one_error_line(*run_cli(args, capsys)[::2])
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("options,bins", [(["--length", "36"], 3), (["--estimator", "taf", "--length", "160"], 3)])
def test_a_fit_on_too_few_distances_is_flagged(tiny_dir, tmp_path, capsys, options, bins):
    """With fewer than rules.FIT_MIN_BINS points any power law fits (R² near 1, regimes moot): said."""
    args = ["profile", tiny_dir, "--out", tmp_path / "r", "--num", "4", "--probes", "random", "--no-report", *options]
    code, _, err = run_cli(args, capsys)
    profile = json.loads((tmp_path / "r/profile.json").read_text())
    assert code == 0 and len(profile["fit"]["bin_centers"]) == bins
    taf = "taf" in options
    assert profile["fit"]["weights"] == ("equal (least squares on points)" if taf else "bin width in ln d")
    assert f"the fit has {bins} distance bin(s)" in err


def test_out_never_replaces_what_is_not_a_run(tiny_dir, tmp_path, capsys, monkeypatch):
    """--out replaces an earlier run only: a directory with other contents (here a copy of the
    model being profiled), a file, or the current directory is refused before any work, untouched."""
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    before = sorted(p.name for p in model.iterdir())
    line = one_error_line(*run_cli(["profile", model, "--out", model, *FAST], capsys)[::2])
    assert "is not an attnprof run" in line and sorted(p.name for p in model.iterdir()) == before
    note = tmp_path / "notes.txt"
    note.write_text("keep me")
    assert "is a file" in one_error_line(*run_cli(["profile", tiny_dir, "--out", note, *FAST], capsys)[::2])
    assert "is a file" in one_error_line(*run_cli(["profile", tiny_dir, "--out", note / "x", *FAST], capsys)[::2])
    assert note.read_text() == "keep me"
    monkeypatch.chdir(model)
    for here in (".", ".."):
        line = one_error_line(*run_cli(["profile", tiny_dir, "--out", here, *FAST], capsys)[::2])
        assert "current directory" in line
    assert sorted(p.name for p in model.iterdir()) == before
    run = tmp_path / "run"
    for _ in range(2):                        # an earlier run is replaced whole
        assert run_cli(["profile", tiny_dir, "--out", run, *FAST], capsys)[0] == 0
    assert (run / "run.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "notes.txt", "run"]


def test_quiet_silences_library_progress_bars_too(tiny_dir, tmp_path):
    """--quiet: no progress output on stderr (warnings only), libraries' own tqdm bars
    (transformers' GGUF conversion) included; checked in a fresh process, as tqdm reads its
    settings when first imported."""
    script = (f"import sys; from profiler.cli import main; "
              f"code = main(['profile', {str(tiny_dir)!r}, '--out', {str(tmp_path / 'r')!r}, *{FAST!r}]); "
              "from tqdm.auto import tqdm; print(code, tqdm(range(1)).disable)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["0", "True"], proc.stderr
    assert all(line.startswith("attnprof: warning:") for line in proc.stderr.splitlines()), proc.stderr


def test_a_target_list_with_one_unknown_name_warns(tiny_dir, tmp_path, capsys):
    """PEFT lists may name modules of other architectures, so one unknown entry is not an error,
    but it is said (a typo would otherwise mark every change to that module as outside the targets)."""
    code, _, err = run_cli(["profile", tiny_dir, "vs", tiny_dir, "--targets", "q_proj,v_porj", "--out", tmp_path / "r",
                            *FAST[:-1]], capsys)
    assert code == 0 and "attnprof: warning: target modules v_porj name no weight" in err


def test_a_run_that_lands_between_our_renames_is_replaced_too(tmp_path, monkeypatch):
    """Two processes writing the same --out: when the other one's run lands between our two
    renames, ours replaces it as well (the last to finish wins), with nothing left behind."""
    import errno
    import os

    from profiler import io
    target = tmp_path / "run"
    real_replace = os.replace
    raced = []

    def racing(src, dst):
        if ".tmp-" in str(src) and not raced:             # the other process is quicker, once
            raced.append(1)
            (target / "run.json").parent.mkdir()
            (target / "run.json").write_text("theirs")
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        real_replace(src, dst)
    monkeypatch.setattr(io.os, "replace", racing)
    with io.atomic_dir(target) as tmp:
        (tmp / "run.json").write_text("ours")
    assert raced and (target / "run.json").read_text() == "ours"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_write_run_returns_the_run_directory(tiny_dir, tmp_path, monkeypatch, capsys):
    """The Python API's write_run gives back the directory it wrote (a Path, relative paths taken
    from the current directory), which the notebook goes on to read; the CLI prints the path as given."""
    import profiler
    from profiler.run import write_run
    monkeypatch.chdir(tmp_path)
    prof = profiler.profile(str(tiny_dir), length=128, num=4, probes="random", quiet=True)
    out = write_run("runs/mine", command="test", profile=prof, render=False)
    assert out == tmp_path / "runs" / "mine" and (out / "run.json").is_file()
    code, _, err = run_cli(["profile", tiny_dir, "--out", "runs/cli", "--length", "128", "--num", "4",
                            "--probes", "random", "--no-report"], capsys)
    assert code == 0 and err.strip().endswith("wrote runs/cli/")


def test_a_failed_rename_leaves_the_earlier_run(tmp_path, monkeypatch):
    """If moving the new run into place fails, the temporary directory goes and the earlier run
    is back where it was."""
    import os

    from profiler import io
    target = tmp_path / "run"
    target.mkdir()
    (target / "run.json").write_text("earlier")
    real_replace = os.replace

    def failing(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk full")
        real_replace(src, dst)
    monkeypatch.setattr(io.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        with io.atomic_dir(target) as tmp:
            (tmp / "run.json").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and (target / "run.json").read_text() == "earlier"


def test_gate_thresholds_decide_the_exit_code(tiny_dir, tmp_path, capsys):
    """The same pair passes under loose thresholds (exit 0) and is a regression when no model-level
    shift is allowed (exit 1); unset thresholds keep their defaults; diff.json records them."""
    other = save_tiny(tmp_path / "other", seed=1, num_key_value_heads=2)
    common = ["profile", tiny_dir, "vs", other, "--no-weights", "--json", *FAST]
    loose = ["--max-model-dgamma", "10", "--max-shifted-heads", "1", "--max-regime-flips", "1"]
    code, stdout, _ = run_cli([*common, "--out", tmp_path / "loose", *loose], capsys)
    assert code == 0 and json.loads(stdout)["verdict"] == "pass"
    code, stdout, _ = run_cli([*common, "--out", tmp_path / "strict", "--max-model-dgamma", "0"], capsys)
    diff = json.loads(stdout)
    assert code == 1 and diff["verdict"] == "regression" and diff["model_dgamma"] != 0
    assert diff["thresholds"] == {"max_model_dgamma": 0.0, "max_shifted_heads": 0.1, "max_regime_flips": 0.1}


@pytest.mark.parametrize("option", [["--merged-load-in-4bit"], ["--max-shifted-heads", "0.2"], ["--max-model-dgamma", "0"],
                                    ["--targets", "q_proj"], ["--adapter-rank", "8"]])
def test_base_vs_merged_options_need_two_models(tiny_dir, capsys, option):
    """A gate threshold or a diff option given with one model would be silently unused (a pipeline
    would think it gated): refused instead, naming the option."""
    line = one_error_line(*run_cli(["profile", tiny_dir, *option], capsys)[::2])
    assert f"{option[0]}: only for two models" in line


def test_console_script_is_installed(tiny_dir, tmp_path):
    exe = Path(sys.executable).parent / "attnprof"
    res = subprocess.run([str(exe), "profile", str(tmp_path / "missing")], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("attnprof: error:")


def test_cached_hub_id_offline(tiny_dir, tmp_path):
    """A hub id resolves from the local HF cache without network; an uncached id is refused by name."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_dir, snapshot)
    (cache / "models--acme--tiny-llama" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abcd")
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    exe = Path(sys.executable).parent / "attnprof"
    ok = subprocess.run([str(exe), "profile", "acme/tiny-llama", "--out", str(tmp_path / "r"), *FAST],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "r/profile.json").read_text())["model"]["name"] == "tiny-llama"
    missing = subprocess.run([str(exe), "profile", "acme/not-cached", *FAST], capture_output=True,
                             text=True, env=env)
    assert missing.returncode == 2
    assert "acme/not-cached" in missing.stderr and "not in the local Hugging Face cache" in missing.stderr
