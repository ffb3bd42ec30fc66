"""Pipeline use: a transformers TrainerCallback that profiles the model under training against its
base at chosen steps, logs the numbers, and stops training when the gate fails."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from .diff import ProfileDiff, diff_profiles
from .errors import AttnprofError
from .profiles import Profile
from .rules import GateThresholds
from .run import ProfileOptions, profile_model_object

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a hard dependency
    TrainerCallback = object  # type: ignore[misc,assignment]


@dataclass
class ProfileGateConfig:
    """When and how to profile during training. Small probes keep the check cheap."""
    every_steps: int = 100
    probes: str = "random"
    length: int = 256
    num: int = 4
    seed: int = 0
    thresholds: GateThresholds = field(default_factory=GateThresholds)
    stop_on_regression: bool = True

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.num < 1 or self.length < 2:
            raise AttnprofError(f"ProfileGateConfig: every_steps, num (≥ 1) and length (≥ 2) must be positive, "
                                f"got every_steps={self.every_steps}, num={self.num}, length={self.length}")


class AttentionProfileCallback(TrainerCallback):
    """Profile the model being trained every `every_steps` steps against the base profile taken at
    the start of training; log model Δgamma, shifted heads and regime flips; stop on regression.

    >>> trainer = Trainer(..., callbacks=[AttentionProfileCallback(tokenizer)])  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, config: ProfileGateConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config or ProfileGateConfig()
        self.base: Profile | None = None
        self.history: list[tuple[int, ProfileDiff]] = []
        self.stopped_at: int | None = None       # the step at which the gate stopped training

    @property
    def regressed(self) -> bool:
        """True when any check failed the gate: a pipeline's test after `trainer.train()`, which
        returns normally when a callback stops training."""
        return any(result.verdict != "pass" for _, result in self.history)

    def _profile(self, model) -> Profile:
        c = self.config
        options = ProfileOptions(probes=c.probes, length=c.length, num=c.num, seed=c.seed, quiet=True)
        return profile_model_object(model, self.tokenizer, options)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self.base is None:
            self.base = self._profile(model)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or self.base is None or state.global_step % self.config.every_steps:
            return control
        result = diff_profiles(self.base, self._profile(model), self.config.thresholds)
        self.history.append((state.global_step, result))
        state.log_history.append({"step": state.global_step, "attnprof/model_dgamma": result.model_dgamma,
                                  "attnprof/shifted_fraction": result.shifted_fraction,
                                  "attnprof/regime_flip_fraction": result.regime_flip_fraction,
                                  "attnprof/verdict": result.verdict})
        if result.verdict != "pass":
            warnings.warn(f"attention profile regression at step {state.global_step}: {'; '.join(result.reasons)}"
                          + (" — stopping training" if self.config.stop_on_regression else ""))
            if self.config.stop_on_regression:
                control.should_training_stop = True
                self.stopped_at = state.global_step
        return control
