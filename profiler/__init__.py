"""attnprof: did the LoRA fine-tune change how the model attends across distance?

Python API (imported lazily, so `import profiler` is cheap):

    profile(model, tokenizer=None, **options) -> Profile        one model
    compare(base, merged, options) -> Comparison                base vs merged (+ weights, verdict)
    diff_profiles(base, merged) -> ProfileDiff                  two stored/in-memory profiles
    assert_profile_close(base, merged, **thresholds)            pytest-friendly gate
    load_profile(run_dir) / load_diff(run_dir)                  read stored runs back
    diff_weights(base_dir, merged_dir) -> WeightDiff            streamed ΔW spectra and ranks
    check_adapter(adapter, base=None) -> AdapterCheck           adapter_config.json check
    AttentionProfileCallback                                    transformers TrainerCallback
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "profile": "run", "compare": "run", "ProfileOptions": "run", "Comparison": "run",
    "Profile": "profiles", "HeadFit": "profiles", "ModelFit": "profiles",
    "diff_profiles": "diff", "assert_profile_close": "diff", "ProfileDiff": "diff", "HeadDiff": "diff",
    "Verdict": "diff", "diff_weights": "weights", "WeightDiff": "weights",
    "check_adapter": "adapter", "AdapterCheck": "adapter",
    "AttentionProfileCallback": "callback", "ProfileGateConfig": "callback",
    "GateThresholds": "rules", "REGIME_RULES": "rules", "AttnprofError": "errors",
    "render_report": "report",
}


def load_profile(run_dir: Any):
    """A stored Profile: RUN_DIR of a single-model run, or RUN_DIR/base | RUN_DIR/merged."""
    from .profiles import Profile
    return Profile.load(run_dir)


def load_diff(run_dir: Any):
    """The ProfileDiff stored in RUN_DIR/diff.json (weights, adapter and flags included)."""
    import json
    from pathlib import Path

    from .diff import HeadDiff, ProfileDiff, verdict_uncertainty
    from .results import from_json
    from .rules import GateThresholds
    data = json.loads((Path(run_dir) / "diff.json").read_text(encoding="utf-8"))
    heads = [from_json(HeadDiff, h) for h in data.pop("heads")]
    if "borderline" not in data:            # written before attnprof said how firm a verdict is
        data["shifted_heads_range"], data["borderline"] = verdict_uncertainty(
            heads, tuple(data["model_dgamma_ci"]), data["regime_flip_fraction"], GateThresholds(**data["thresholds"]))
    return from_json(ProfileDiff, {**data, "heads": heads})


# the stage modules, reachable as profiler.run, profiler.plots, ... without importing them first
_MODULES = ("adapter", "callback", "capture", "dense", "diff", "fit", "io", "load", "plots", "probes",
            "profiles", "report", "rules", "run", "sources", "spectra", "weights")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'profiler' has no attribute {name!r}")


__all__ = sorted(list(_EXPORTS) + ["load_profile", "load_diff", "__version__"])
