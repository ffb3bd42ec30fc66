"""Profile: one model's fitted attention-distance profile, and how it is stored in a run directory.

`Profile` holds the JSON-able results (per-head `HeadFit`s, the model-level `ModelFit`) and the
raw per-probe arrays (`curves`, `input_ids`) from which every number can be re-derived.
Files: profile.json (deterministic), curves.npz (A, sink, local, entropy, distances), probes.npz.
"""
from __future__ import annotations

import json
import platform
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, fit, rules
from .capture import Capture
from .errors import AttnprofError
from .results import NOT_JSON, Result, dumps, from_json, head_index


@dataclass
class HeadFit(Result):
    """The fit of one attention head."""
    layer: int
    head: int
    gamma: float
    gamma_ci: tuple[float, float]
    intercept: float
    r2: float
    exp_r2: float
    exp_lambda: float
    residual_rms: float
    sink_mass: float
    local_mass: float
    entropy: float
    regime: str


@dataclass
class ModelFit(Result):
    """The fit of the profile averaged over all layers and heads, beside the closed-form RoPE value."""
    gamma: float
    gamma_ci: tuple[float, float]
    intercept: float
    r2: float
    exp_r2: float
    gamma_pade: float | None
    pade_flag: bool | None
    pade_relative_error: float | None


def versions() -> dict[str, str]:
    import torch
    import transformers
    return {"attnprof": __version__, "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__, "python": platform.python_version()}


@dataclass
class Profile(Result):
    """One model's attention-distance profile. Index it with [layer, head] for a HeadFit."""
    model: dict[str, Any]
    probes: dict[str, Any]
    fit: dict[str, Any]
    heads: list[HeadFit]
    model_level: ModelFit
    versions: dict[str, str]
    curves: Capture = field(repr=False, metadata=NOT_JSON)
    input_ids: np.ndarray = field(repr=False, metadata=NOT_JSON)

    def __getitem__(self, key: tuple[int, int]) -> HeadFit:
        return self.heads[head_index(key, self.model["num_layers"], self.model["num_heads"])]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for h in self.heads:
            row = h.to_dict()
            row["gamma_lo"], row["gamma_hi"] = row.pop("gamma_ci")
            out.append(row)
        return out

    def regime_counts(self) -> dict[str, int]:
        counts = Counter(h.regime for h in self.heads)
        return {r: counts.get(r, 0) for r in rules.REGIMES}

    def gamma_grid(self) -> np.ndarray:
        """Gamma as a (layers, heads) array."""
        return np.array([h.gamma for h in self.heads]).reshape(self.model["num_layers"], -1)

    def summary(self) -> dict[str, Any]:
        m = self.model_level
        return {"model": self.model["name"], "heads": len(self.heads),
                "gamma": f"{m.gamma:.3f} [{m.gamma_ci[0]:.3f}, {m.gamma_ci[1]:.3f}]",
                "gamma_pade": None if m.gamma_pade is None else round(m.gamma_pade, 3),
                "regimes": ", ".join(f"{k} {v}" for k, v in self.regime_counts().items() if v),
                "probes": f"{self.probes['suite']} T={self.probes['length']} N={self.probes['num']}"}

    def save(self, directory: str | Path) -> None:
        """Write profile.json, curves.npz and probes.npz into an existing directory."""
        directory = Path(directory)
        (directory / "profile.json").write_text(self.to_json(), encoding="utf-8")
        c = self.curves
        np.savez_compressed(directory / "curves.npz", A=c.A.astype(np.float32),
                            sink=c.sink.astype(np.float32), local=c.local.astype(np.float32),
                            entropy=c.entropy.astype(np.float32), distances=c.distances)
        np.savez_compressed(directory / "probes.npz", input_ids=self.input_ids.astype(np.int64))

    @classmethod
    def load(cls, directory: str | Path) -> "Profile":
        """Read a stored profile back (no model needed)."""
        directory = Path(directory)
        try:
            data = json.loads((directory / "profile.json").read_text(encoding="utf-8"))
            with np.load(directory / "curves.npz") as z:
                curves = Capture(A=z["A"], sink=z["sink"], local=z["local"], entropy=z["entropy"],
                                 distances=z["distances"] if "distances" in z else np.arange(z["A"].shape[-1]),
                                 path="hooks" if data["probes"].get("capture") == "eager weights" else "stream")
            with np.load(directory / "probes.npz") as z:
                input_ids = z["input_ids"]
        except (OSError, KeyError, ValueError) as exc:
            raise AttnprofError(f"{directory}: not a stored profile ({exc.__class__.__name__}: {exc})") from None
        heads = [from_json(HeadFit, h) for h in data["heads"]]
        return cls(data["model"], data["probes"], data["fit"], heads, from_json(ModelFit, data["model_level"]),
                   data["versions"], curves, input_ids)


@dataclass(frozen=True)
class FitSetup:
    """Everything the fit needs besides the arrays: the bins and the bootstrap draws."""
    bins: fit.Bins
    resample: np.ndarray

    @classmethod
    def make(cls, d_max: int, num_probes: int, seed: int,
             samples: int = rules.BOOTSTRAP_SAMPLES, d_min: int = rules.FIT_D_MIN) -> "FitSetup":
        """Log-spaced bins over [d_min, d_max] and the seeded bootstrap draws."""
        if d_max <= d_min:
            raise AttnprofError(f"fit range is empty: the farthest profiled distance ({d_max}) must "
                                f"exceed d_min={d_min}; use a longer probe (--length)")
        return cls(fit.log_bins(d_min, d_max), fit.bootstrap_indices(num_probes, samples, seed))

    @classmethod
    def points(cls, distances: np.ndarray, num_probes: int, seed: int,
               samples: int = rules.BOOTSTRAP_SAMPLES) -> "FitSetup":
        """An ordinary least-squares fit on given point distances (the TAF protocol)."""
        return cls(fit.point_bins(distances), fit.bootstrap_indices(num_probes, samples, seed))

    def describe(self) -> dict[str, Any]:
        return {"d_min": int(self.bins.lo[0]), "d_max": int(self.bins.hi[-1] - 1),
                "bin_centers": self.bins.center, "bootstrap": int(self.resample.shape[0]),
                "ci_level": rules.CI_LEVEL,
                "weights": "bin width in ln d" if self.bins.weights is None else "equal (least squares on points)"}


def fit_capture(curves: Capture, setup: FitSetup) -> tuple[dict, np.ndarray, dict, np.ndarray]:
    """Per-head and model-level fits with bootstrap CIs from per-probe arrays."""
    binned = fit.bin_profile(curves.A, setup.bins, curves.distances)          # (N, L, H, nb)
    heads = fit.power_law(binned.mean(axis=0), setup.bins)
    heads_ci = fit.percentile_ci(fit.bootstrap_gamma(binned, setup.bins, setup.resample))
    model, model_ci = model_level_fit(binned, setup)
    return heads, heads_ci, model, model_ci


def model_level_fit(binned: np.ndarray, setup: FitSetup) -> tuple[dict, np.ndarray]:
    """The fit of the mean profile over layers and heads, and its bootstrap CI over probes.

    binned: (N, L, H, nb) per-probe binned profiles."""
    model_binned = binned.mean(axis=(1, 2))                                   # (N, nb)
    model = fit.power_law(model_binned.mean(axis=0), setup.bins)
    return model, fit.percentile_ci(fit.bootstrap_gamma(model_binned, setup.bins, setup.resample))


def build_profile(curves: Capture, input_ids: np.ndarray, model: dict, probes: dict,
                  setup: FitSetup) -> Profile:
    """Fit a capture into a Profile (pure: no model, no files)."""
    heads, heads_ci, model_fit, model_ci = fit_capture(curves, setup)
    sink, local, entropy = (x.mean(axis=0) for x in (curves.sink, curves.local, curves.entropy))
    labels = fit.label_heads(heads, sink, local)
    layers, num_heads = sink.shape
    head_fits = [HeadFit(layer=l, head=h, gamma=heads["gamma"][l, h], gamma_ci=tuple(heads_ci[l, h]),
                         intercept=heads["intercept"][l, h], r2=heads["r2"][l, h],
                         exp_r2=heads["exp_r2"][l, h], exp_lambda=heads["exp_lambda"][l, h],
                         residual_rms=heads["residual_rms"][l, h], sink_mass=sink[l, h],
                         local_mass=local[l, h], entropy=entropy[l, h], regime=labels[l, h])
                 for l in range(layers) for h in range(num_heads)]
    gamma = float(model_fit["gamma"])
    pade, flag, rel = fit.pade_check(gamma, model.get("rope_theta"), int(probes["length"]))
    level = ModelFit(gamma=gamma, gamma_ci=tuple(model_ci), intercept=float(model_fit["intercept"]),
                     r2=float(model_fit["r2"]), exp_r2=float(model_fit["exp_r2"]), gamma_pade=pade,
                     pade_flag=flag, pade_relative_error=rel)
    return Profile(model=model, probes=probes, fit=setup.describe(), heads=head_fits,
                   model_level=level, versions=versions(), curves=curves, input_ids=input_ids)


def terminal_summary(profile: Profile) -> str:
    """A few lines for stderr: regime counts, model gamma vs Padé, extreme heads."""
    m = profile.model_level
    lines = [f"{profile.model['name']}: {len(profile.heads)} heads, probes {profile.probes['suite']} "
             f"T={profile.probes['length']} N={profile.probes['num']}",
             f"  model gamma {m.gamma:.3f}  95% CI [{m.gamma_ci[0]:.3f}, {m.gamma_ci[1]:.3f}]  R² {m.r2:.3f}"]
    if m.gamma_pade is not None:
        note = "  ← outside the closed form's regime of validity" if m.pade_flag else ""
        lines.append(f"  closed-form RoPE gamma_Pade {m.gamma_pade:.3f} (relative gap "
                     f"{m.pade_relative_error:.0%}){note}")
    lines.append("  regimes: " + ", ".join(f"{k} {v}" for k, v in profile.regime_counts().items() if v))
    # flat heads (γ < 0.2, negative γ: attention that grows with distance) are not long-range
    fitted = [h for h in profile.heads if h.regime not in ("sink", "local", "irregular", "flat")]
    if fitted:
        ordered = sorted(fitted, key=lambda h: h.gamma)
        fmt = lambda hs: ", ".join(f"L{h.layer}H{h.head} γ={h.gamma:.2f}" for h in hs)
        lines.append(f"  most long-range: {fmt(ordered[:3])}")
        lines.append(f"  least long-range: {fmt(ordered[-3:][::-1])}")
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    path.write_text(dumps(data), encoding="utf-8")
