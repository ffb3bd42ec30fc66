"""Write a synthetic attnprof run directory (single or pair) from numpy alone.

The files follow the run-directory schema that capture/fit/diff produce, so the report can be
rendered and tested without a model. Profiles are noisy power laws A(d) ∝ d^(-gamma); the fit is
a plain least-squares fit in log-log space with a percentile bootstrap over probes.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np

from profiler.results import dumps
from profiler.rules import (BOOTSTRAP_SAMPLES, CI_LEVEL, FIT_BINS_PER_OCTAVE, FIT_D_MIN,
                            PADE_RELATIVE_TOLERANCE, REGIMES, SHIFT_MIN_ABS_DGAMMA, GateThresholds,
                            regime_label)

VERSIONS = {"attnprof": "0.1.0", "torch": "2.13.0", "transformers": "5.0.0", "python": "3.11.7"}
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TARGETS = ("q_proj", "v_proj")
ADAPTER_RANK = 8
BOOTSTRAP = 50


def _bins(d_min: int, d_max: int) -> np.ndarray:
    """Log-spaced integer distances between d_min and d_max."""
    n = max(2, int(round(math.log2(d_max / d_min) * FIT_BINS_PER_OCTAVE)) + 1)
    return np.unique(np.round(np.geomspace(d_min, d_max, n)).astype(int))


def _fit(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of y (..., n) on x (n,): gamma, intercept, R², residual RMS."""
    xc = x - x.mean()
    slope = (y - y.mean(-1, keepdims=True)) @ xc / (xc @ xc)
    intercept = y.mean(-1) - slope * x.mean()
    resid = y - (intercept[..., None] + slope[..., None] * x)
    ss_tot = ((y - y.mean(-1, keepdims=True)) ** 2).sum(-1)
    r2 = 1 - (resid ** 2).sum(-1) / np.where(ss_tot > 0, ss_tot, np.nan)
    return -slope, intercept, r2, np.sqrt((resid ** 2).mean(-1))


def _gamma_boot(A: np.ndarray, idx: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Bootstrap gammas (B, ...) of the probe-mean profile of A (N, ..., D) for resamples idx (B, N)."""
    x = np.log(bins)
    sel = A[..., bins]
    return np.stack([_fit(np.log(sel[i].mean(0)), x)[0] for i in idx])


def _ci(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    alpha = (1 - CI_LEVEL) / 2
    return np.quantile(samples, alpha, axis=0), np.quantile(samples, 1 - alpha, axis=0)


def _profiles(gammas: np.ndarray, noise: np.ndarray, D: int) -> np.ndarray:
    """Curves (N, L, H, D) for head exponents (L, H) times multiplicative noise (N, L, H, D)."""
    d = np.maximum(np.arange(D), 1.0)
    A = d ** -gammas[None, :, :, None] * noise
    return (0.8 * A / A.sum(-1, keepdims=True)).astype(np.float32)


def _profile_json(name: str, A: np.ndarray, sink: np.ndarray, local: np.ndarray,
                  entropy: np.ndarray, T: int, W: int, seed: int, rope_theta: float | None,
                  idx: np.ndarray) -> dict[str, Any]:
    N, L, H, D = A.shape
    d_max = D - 1
    bins = _bins(FIT_D_MIN, d_max)
    x = np.log(bins)
    gamma, intercept, r2, rms = _fit(np.log(A[..., bins].mean(0)), x)
    lo, hi = _ci(_gamma_boot(A, idx, bins))
    exp_r2 = r2 - 0.2
    heads = []
    for layer in range(L):
        for head in range(H):
            s, loc = float(sink[:, layer, head].mean()), float(local[:, layer, head].mean())
            heads.append({
                "layer": layer, "head": head, "gamma": gamma[layer, head],
                "gamma_ci": [lo[layer, head], hi[layer, head]], "intercept": intercept[layer, head],
                "r2": r2[layer, head], "exp_r2": exp_r2[layer, head], "exp_lambda": 0.01,
                "residual_rms": rms[layer, head], "sink_mass": s, "local_mass": loc,
                "entropy": float(entropy[:, layer, head].mean()),
                "regime": regime_label(gamma[layer, head], r2[layer, head], rms[layer, head], s, loc),
            })
    mean = A.mean((1, 2))
    mg, mi, mr2, _ = _fit(np.log(mean[:, bins].mean(0)), x)
    mlo, mhi = _ci(_gamma_boot(A.mean((1, 2)), idx, bins))
    pade = None
    if rope_theta is not None:
        pade = (2 * rope_theta - T * math.sqrt(2)) / (2 * rope_theta + T * math.sqrt(2))
    rel = None if pade is None else abs(float(mg) - pade) / pade
    return {
        "model": {"name": name, "architecture": "LlamaForCausalLM", "num_layers": L,
                  "num_heads": H, "num_kv_heads": max(1, H // 2), "head_dim": 64,
                  "rope_theta": rope_theta, "max_positions": 8192, "source": f"/models/{name}"},
        "probes": {"suite": "text:stdlib", "length": T, "num": N, "seed": seed, "window": W,
                   "estimator": "tail"},
        "fit": {"d_min": FIT_D_MIN, "d_max": d_max, "bin_centers": bins.tolist(),
                "bootstrap": BOOTSTRAP_SAMPLES, "ci_level": CI_LEVEL},
        "heads": heads,
        "model_level": {"gamma": mg, "gamma_ci": [mlo, mhi], "intercept": mi, "r2": mr2,
                        "exp_r2": mr2 - 0.3, "gamma_pade": pade,
                        "pade_flag": None if rel is None else bool(rel > PADE_RELATIVE_TOLERANCE),
                        "pade_relative_error": rel},
        "versions": VERSIONS,
    }


def _write_model(folder: Path, profile: dict, A: np.ndarray, sink: np.ndarray, local: np.ndarray,
                 entropy: np.ndarray, ids: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "profile.json").write_text(dumps(profile), encoding="utf-8")
    np.savez_compressed(folder / "curves.npz", A=A, sink=sink.astype(np.float32),
                        local=local.astype(np.float32), entropy=entropy.astype(np.float32))
    np.savez_compressed(folder / "probes.npz", input_ids=ids)


def _weights(rng: np.random.Generator, L: int, outside: bool) -> dict[str, Any]:
    """Synthetic weight diff: q/v of every layer carry a rank-8 change, the rest bf16 rounding;
    with `outside`, layer 1's down_proj also changes with a high rank (not a LoRA merge)."""
    tensors, flags = [], []
    names = ["model.embed_tokens.weight"] + [
        f"model.layers.{layer}.{m}.weight" for layer in range(L)
        for m in MODULES + ("input_layernorm", "post_attention_layernorm")]
    odd_name = f"model.layers.{min(1, L - 1)}.mlp.down_proj.weight"
    floor = 2e-3
    for name in names:
        module = name.split(".")[-2]
        vector = module.endswith("layernorm")
        in_targets = module in TARGETS
        odd = outside and name == odd_name
        t: dict[str, Any] = {
            "name": name, "shape": [576] if vector else [576, 576], "dtype_base": "float32",
            "dtype_merged": "bfloat16", "in_targets": in_targets, "noise_floor": floor,
            "svd": None, "top_singular_values": [], "adapter_rank": None, "adapter_scale": None,
            "adapter_singular_values": [], "adapter_rel_error": None,
            "adapter_residual_noise": None, "shape_merged": None, "rank90": None,
            "rank90_is_lower_bound": False, "stable_rank": None, "signal_rank": None,
            "signal_rank_is_lower_bound": False,
        }
        if (in_targets or odd) and not vector:
            rank = 48 if odd else ADAPTER_RANK
            scale = float(rng.uniform(0.02, 0.08))
            signal = scale * 40 * np.exp(-np.arange(rank) / (rank / 2.5))
            sv = np.concatenate([signal, floor * (1 - 0.01 * np.arange(32 - min(rank, 31)))])[:32]
            t.update(status="high-rank" if odd else "low-rank", changed=True, rel_norm=scale,
                     fro_norm=scale * 24.0, rank90=int(rank * 0.7), stable_rank=rank / 2.0,
                     signal_rank=rank, signal_rank_is_lower_bound=odd, svd="randomized" if odd
                     else "exact", top_singular_values=sv.tolist())
            if in_targets:
                t.update(adapter_rank=ADAPTER_RANK, adapter_scale=2.0,
                         adapter_singular_values=sv[:ADAPTER_RANK].tolist(), adapter_rel_error=1e-3)
        else:
            t.update(status="rounding only", changed=False, rel_norm=4e-4, fro_norm=0.0096)
        tensors.append(t)
    if outside:
        flags.append({"code": "changed_outside_targets", "severity": "warning",
                      "message": f"1 module changed outside the adapter targets: {odd_name}",
                      "tensors": [odd_name]})
        flags.append({"code": "high_rank_change", "severity": "warning",
                      "message": f"{odd_name}: signal rank 48 > {ADAPTER_RANK} (adapter rank)",
                      "tensors": [odd_name]})
    changed = [t for t in tensors if t["changed"]]
    return {"base": "/models/fake-base", "merged": "/models/fake-merged",
            "adapter": "/models/fake-adapter", "target_modules": list(TARGETS),
            "adapter_rank": ADAPTER_RANK, "num_tensors": len(tensors), "num_changed": len(changed),
            "num_rounding_only": len(tensors) - len(changed),
            "num_outside_targets": int(outside), "num_missing": 0, "num_extra": 0,
            "max_signal_rank": max(t["signal_rank"] for t in changed) if changed else None,
            "max_rel_norm": max(t["rel_norm"] for t in tensors), "flags": flags,
            "tensors": tensors, "missing": [], "extra": []}


def _adapter() -> dict[str, Any]:
    return {
        "config": {"peft_type": "LORA", "r": ADAPTER_RANK, "lora_alpha": 16,
                   "target_modules": list(TARGETS), "use_rslora": False, "use_dora": False,
                   "task_type": "CAUSAL_LM", "base_model_name_or_path": "fake/base"},
        "check": {
            "compatible": True, "scale": 2.0, "trainable_params": 221184,
            "findings": [
                {"code": "targets_attention_only", "severity": "info",
                 "message": "targets only attention projections (q_proj, v_proj)"},
                {"code": "base_unknown", "severity": "warning",
                 "message": "base 'fake/base' is not in the local cache; names not checked"},
            ],
            "evidence": {
                "rank": ADAPTER_RANK,
                "rows": [{"source_short": "Biderman et al. 2024 (TMLR)", "lora_rank": 16,
                          "method": "LoRA", "value": 0.61, "source_arxiv": "2405.09673"}],
            },
        },
    }


def _js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    m = (p + q) / 2
    return 0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_run(run_dir: str | Path, kind: str = "pair", layers: int = 2, heads: int = 4,
              length: int = 256, window: int = 64, num: int = 4, seed: int = 0,
              shifted: int = 3, delta: float = 0.3, weights: bool = True, adapter: bool = True,
              rope_theta: float | None = 10000.0) -> Path:
    """Write a synthetic run into `run_dir` and return it.

    kind "single" writes one profile; "pair" a base and a merged profile where the first
    `shifted` heads (layer-major) have their exponent raised by `delta`, plus diff.json.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    L, H, N, T, W = layers, heads, num, length, window
    D = T - W + 1
    gammas = rng.uniform(0.1, 1.4, size=(L, H))
    noise = rng.lognormal(0.0, 0.15, size=(N, L, H, 1)) * rng.lognormal(0.0, 0.08, size=(N, L, H, D))
    sink = np.clip(rng.normal(0.15, 0.05, size=(N, L, H)), 0, 1)
    sink[:, 0, 0] = 0.7
    local = np.clip(rng.normal(0.1, 0.03, size=(N, L, H)), 0, 1)
    if L * H > 1:
        local[:, -1, -1] = 0.6
    entropy = np.clip(rng.normal(0.6, 0.1, size=(N, L, H)), 0, 1)
    ids = rng.integers(0, 49152, size=(N, T), dtype=np.int64)
    idx = rng.integers(0, N, size=(BOOTSTRAP, N))
    A = _profiles(gammas, noise, D)
    base = _profile_json("fake-base", A, sink, local, entropy, T, W, seed, rope_theta, idx)
    command = f"attnprof profile fake-base --length {T} --num {N} --seed {seed}"
    if kind == "single":
        _write_model(run_dir, base, A, sink, local, entropy, ids)
        files = ["profile.json", "curves.npz", "probes.npz"]
    elif kind == "pair":
        flat = gammas.reshape(-1).copy()
        flat[:shifted] += delta
        noise_m = noise * rng.lognormal(0.0, 0.01, size=noise.shape)
        A_m = _profiles(flat.reshape(L, H), noise_m, D)
        sink_m = sink + rng.normal(0, 0.005, size=sink.shape)
        merged = _profile_json("fake-merged", A_m, sink_m, local, entropy, T, W, seed,
                               rope_theta, idx)
        _write_model(run_dir / "base", base, A, sink, local, entropy, ids)
        _write_model(run_dir / "merged", merged, A_m, sink_m, local, entropy, ids)
        diff = _diff(base, merged, A, A_m, idx, weights, adapter, rng)
        (run_dir / "diff.json").write_text(dumps(diff), encoding="utf-8")
        command = f"attnprof profile fake-base vs fake-merged --length {T} --num {N} --seed {seed}"
        files = [f"{m}/{f}" for m in ("base", "merged")
                 for f in ("profile.json", "curves.npz", "probes.npz")] + ["diff.json"]
    else:
        raise ValueError(f"kind must be 'single' or 'pair', not {kind!r}")
    run = {"kind": kind, "command": command, "versions": VERSIONS,
           "files": {f: _sha256(run_dir / f) for f in files}, "seed": seed}
    (run_dir / "run.json").write_text(dumps(run), encoding="utf-8")
    if kind == "pair":
        from profiler.report import summary_markdown
        (run_dir / "summary.md").write_text(summary_markdown(run_dir), encoding="utf-8")
    return run_dir


def _diff(base: dict, merged: dict, A: np.ndarray, A_m: np.ndarray, idx: np.ndarray,
          weights: bool, adapter: bool, rng: np.random.Generator) -> dict[str, Any]:
    """diff.json for two synthetic profiles, with a paired bootstrap over the same probes."""
    bins = np.asarray(base["fit"]["bin_centers"])
    dboot = _gamma_boot(A_m, idx, bins) - _gamma_boot(A, idx, bins)
    lo, hi = _ci(dboot)
    mboot = _gamma_boot(A_m.mean((1, 2)), idx, bins) - _gamma_boot(A.mean((1, 2)), idx, bins)
    mlo, mhi = _ci(mboot)
    js = _js(A.mean(0).astype(np.float64), A_m.mean(0).astype(np.float64))
    heads, counts = [], np.zeros((len(REGIMES), len(REGIMES)), dtype=int)
    for hb, hm in zip(base["heads"], merged["heads"]):
        layer, head = hb["layer"], hb["head"]
        dg = float(hm["gamma"] - hb["gamma"])
        ci = [float(lo[layer, head]), float(hi[layer, head])]
        shifted = (ci[0] > 0 or ci[1] < 0) and abs(dg) >= SHIFT_MIN_ABS_DGAMMA
        counts[REGIMES.index(hb["regime"]), REGIMES.index(hm["regime"])] += 1
        heads.append({"layer": layer, "head": head, "gamma_base": hb["gamma"],
                      "gamma_merged": hm["gamma"], "dgamma": dg, "dgamma_ci": ci,
                      "js": js[layer, head], "dsink": hm["sink_mass"] - hb["sink_mass"],
                      "shifted": bool(shifted), "regime_base": hb["regime"],
                      "regime_merged": hm["regime"]})
    n = len(heads)
    n_shift = sum(h["shifted"] for h in heads)
    flips = sum(h["regime_base"] != h["regime_merged"] for h in heads)
    mdg = float(merged["model_level"]["gamma"] - base["model_level"]["gamma"])
    t = GateThresholds()
    reasons = []
    if abs(mdg) > t.max_model_dgamma:
        reasons.append(f"model |Δgamma| {abs(mdg):.3f} > {t.max_model_dgamma}")
    if n_shift / n > t.max_shifted_heads:
        reasons.append(f"shifted heads {n_shift / n:.1%} > {t.max_shifted_heads:.0%}")
    if flips / n > t.max_regime_flips:
        reasons.append(f"regime flips {flips / n:.1%} > {t.max_regime_flips:.0%}")
    wdiff = _weights(rng, base["model"]["num_layers"], outside=bool(reasons)) if weights else None
    weight_flags = list(wdiff.pop("flags", [])) if wdiff else []
    tensors = wdiff.pop("tensors") if wdiff else None
    return {
        "verdict": "regression" if reasons else "pass",
        "thresholds": {"max_model_dgamma": t.max_model_dgamma,
                       "max_shifted_heads": t.max_shifted_heads,
                       "max_regime_flips": t.max_regime_flips},
        "reasons": reasons or ["all within thresholds"],
        "model_dgamma": mdg, "model_dgamma_ci": [mlo, mhi],
        "shifted_heads": n_shift, "shifted_fraction": n_shift / n,
        "regime_flips": flips, "regime_flip_fraction": flips / n,
        "js_mean": float(js.mean()),
        "transitions": {"labels": list(REGIMES), "counts": counts.tolist()},
        "heads": heads,
        "weights": tensors,
        "weights_summary": wdiff,
        "adapter": _adapter() if adapter else None,
        "flags": weight_flags + [{"code": "pade_outside_validity", "severity": "info",
                                  "message": "model gamma is outside the closed-form's regime of validity"}],
    }
