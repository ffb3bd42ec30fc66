"""Every threshold and regime rule of attnprof, in one place.

The regime table is read top to bottom; the first rule whose condition holds names the head.
Gate thresholds are the defaults of the CLI flags `--max-model-dgamma`, `--max-shifted-heads`
and `--max-regime-flips` (see the README's statistics section).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .errors import AttnprofError

# --- fit ------------------------------------------------------------------------------------
FIT_D_MIN = 16              # first distance of the fit range
# The tail window's first query reaches key 0 at d = T - W, so the last few distances carry the
# attention sink (the first tokens) at weight 1/W: the fit stops this many distances earlier, so
# keys 0..FIT_SINK_MARGIN-1 never enter it (their mass is reported as sink mass instead).
FIT_SINK_MARGIN = 8
FIT_MIN_BINS = 4            # fewer distance bins (or TAF points) than this: the fit is flagged as coarse
FIT_BINS_PER_OCTAVE = 4     # log-spaced bins between FIT_D_MIN and d_max = T - W - FIT_SINK_MARGIN
BOOTSTRAP_SAMPLES = 200     # percentile bootstrap over probes
CI_LEVEL = 0.95
PROFILE_FLOOR = 1e-30       # A(d) below this is treated as this (log of 0 is undefined)
# R^2 is undefined for a profile that does not vary; a poor R^2 only marks a head "irregular"
# when the residual scatter around the power law is also material (RMS of ln A).
IRREGULAR_MIN_RESIDUAL_RMS = 0.10

# --- regimes ----------------------------------------------------------------------------------
SINK_MASS_MIN = 0.5
LOCAL_MASS_MIN = 0.5
LOCAL_MAX_DISTANCE = 2
IRREGULAR_R2_MAX = 0.5
FLAT_GAMMA_MAX = 0.2
CRITICAL_GAMMA_LO = 0.95
CRITICAL_GAMMA_HI = 1.05


@dataclass(frozen=True)
class RegimeRule:
    label: str
    rule: str          # human-readable condition, shown in the README and the report
    taf_name: str = ""


REGIME_RULES: tuple[RegimeRule, ...] = (
    RegimeRule("sink", f"sink mass >= {SINK_MASS_MIN}"),
    RegimeRule("local", f"local mass (d <= {LOCAL_MAX_DISTANCE}) >= {LOCAL_MASS_MIN}"),
    RegimeRule("irregular", f"power-law R^2 < {IRREGULAR_R2_MAX} and residual RMS(ln A) > "
                            f"{IRREGULAR_MIN_RESIDUAL_RMS}"),
    RegimeRule("flat", f"gamma < {FLAT_GAMMA_MAX}"),
    RegimeRule("long-range", f"{FLAT_GAMMA_MAX} <= gamma < {CRITICAL_GAMMA_LO}", "phase A (deconfined)"),
    RegimeRule("critical", f"{CRITICAL_GAMMA_LO} <= gamma <= {CRITICAL_GAMMA_HI}", "Hagedorn crossover"),
    RegimeRule("short-range", f"gamma > {CRITICAL_GAMMA_HI}", "phase B (confined)"),
)
REGIMES: tuple[str, ...] = tuple(r.label for r in REGIME_RULES)


def regime_label(gamma: float, r2: float, residual_rms: float, sink_mass: float,
                 local_mass: float) -> str:
    """The first rule of REGIME_RULES that holds for one head."""
    if sink_mass >= SINK_MASS_MIN:
        return "sink"
    if local_mass >= LOCAL_MASS_MIN:
        return "local"
    if r2 < IRREGULAR_R2_MAX and residual_rms > IRREGULAR_MIN_RESIDUAL_RMS:
        return "irregular"
    if gamma < FLAT_GAMMA_MAX:
        return "flat"
    if gamma < CRITICAL_GAMMA_LO:
        return "long-range"
    if gamma <= CRITICAL_GAMMA_HI:
        return "critical"
    return "short-range"


# --- model level: closed-form RoPE prediction -------------------------------------------------
PADE_RELATIVE_TOLERANCE = 0.15   # |gamma_obs - gamma_pade| / gamma_pade above this is flagged

# --- diff and gate ----------------------------------------------------------------------------
SHIFT_MIN_ABS_DGAMMA = 0.05      # a head has shifted when its CI excludes 0 and |dgamma| >= this


@dataclass(frozen=True)
class GateThresholds:
    """The regression gate. Any value exceeded -> verdict "regression" (exit 1)."""
    max_model_dgamma: float = 0.05     # |model-level delta gamma|
    max_shifted_heads: float = 0.10    # fraction of heads that shifted
    max_regime_flips: float = 0.10     # fraction of heads whose regime label changed

    def __post_init__(self) -> None:
        """A NaN threshold is never exceeded and a fraction above 1 never can be: either would
        turn the gate off without a word, so they are refused, as are negative values."""
        for f in fields(self):
            value, fraction = getattr(self, f.name), f.name != "max_model_dgamma"
            try:                                # numbers of any kind (numpy, Decimal), not text
                number = math.nan if isinstance(value, (str, bytes)) else float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number) or number < 0 or (fraction and number > 1):
                need = "a fraction in [0, 1] (0.10 = 10 % of heads)" if fraction else "a finite number ≥ 0"
                raise AttnprofError(f"gate threshold {f.name} (--{f.name.replace('_', '-')}) is {value!r}: "
                                    f"it must be {need}")


# --- weights ----------------------------------------------------------------------------------
RANK_ENERGY = 0.90                 # rank90: smallest k whose top-k singular values hold 90% of ||dW||_F^2
RANK_WELL_ABOVE_ADAPTER = 2.0      # signal rank > this x adapter rank -> "not a pure LoRA merge"
NOISE_FLOOR_MARGIN = 1.1           # signal = singular values above this x the rounding-noise edge bound
LOW_RANK_MAX_FRACTION = 0.25       # signal rank <= this x min(m, n) -> "low-rank", above -> "high-rank"
MERGE_RESIDUAL_NOISE_MAX = 2.0     # ||dW - scale*B*A||_F above this x the expected rounding noise ...
MERGE_REL_ERROR_MIN = 1e-3         # ... and above this fraction of ||scale*B*A||_F -> "merge_unfaithful"

# --- adapter check ----------------------------------------------------------------------------
SCALING_HIGH = 4.0
SCALING_LOW = 0.25

# --- adapter check: forgetting evidence -------------------------------------------------------
# A published LoRA row is "near" an adapter when its rank is within this factor of the adapter's
# rank (r/4 <= rank <= 4r); only near rows are shown, and none is turned into a number for the adapter.
EVIDENCE_RANK_FACTOR = 4.0
