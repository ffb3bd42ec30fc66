"""Run: the stages glued together — load, probes, capture, fit — for the CLI and the Python API.

`profile()` returns a `Profile` for one model; `compare()` (in diff.py's terms) profiles base and
merged on identical token ids. Models are loaded one at a time and released before the next.
"""
from __future__ import annotations

import gc
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import capture as cap
from .errors import AttnprofError
from .load import LoadedModel, load_model
from .probes import DEFAULT_SUITE, ProbeSet, build_probes, fingerprint
from .profiles import FitSetup, Profile, build_profile

DEFAULT_LENGTH = 2048
DEFAULT_NUM = 8


@dataclass
class ProfileOptions:
    """The knobs shared by every profiling entry point (CLI flags of the same names)."""
    probes: str = DEFAULT_SUITE
    length: int | None = None          # None: DEFAULT_LENGTH capped at the model's max positions
    num: int = DEFAULT_NUM
    seed: int = 0
    window: int | None = None          # None: min(256, T/8)
    estimator: str = "tail"            # tail | dense | taf
    device: str = "auto"
    dtype: str = "auto"
    allow_truncate: bool = False
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    device_map: str | None = None
    quiet: bool = True

    def load_kwargs(self) -> dict[str, Any]:
        return dict(device=self.device, dtype=self.dtype, load_in_4bit=self.load_in_4bit,
                    load_in_8bit=self.load_in_8bit, device_map=self.device_map)


def resolve_length(requested: int | None, max_positions: int | None, allow_truncate: bool) -> int:
    """The probe length: the default is capped at max positions with a warning; an explicit length
    above max positions is refused unless allow_truncate."""
    if requested is None:
        if max_positions and max_positions < DEFAULT_LENGTH:
            warnings.warn(f"probe length capped at the model's max positions ({max_positions})")
            return int(max_positions)
        return DEFAULT_LENGTH
    if max_positions and requested > max_positions:
        if not allow_truncate:
            raise AttnprofError(f"probe length {requested} exceeds the model's max positions "
                                f"({max_positions}); pass --allow-truncate to cap it")
        warnings.warn(f"probe length {requested} truncated to the model's max positions ({max_positions})")
        return int(max_positions)
    return int(requested)


def progress_bar(total: int, desc: str, quiet: bool) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A tqdm bar on stderr (or nothing when quiet): returns (advance, close)."""
    if quiet:
        return (lambda n: None), (lambda: None)
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="probe")
    return bar.update, bar.close


def make_probes(tokenizer, options: ProfileOptions, max_positions: int | None) -> ProbeSet:
    length = resolve_length(options.length, max_positions, options.allow_truncate)
    return build_probes(options.probes, tokenizer, length, options.num, options.seed)


def capture_loaded(loaded: LoadedModel, probes: ProbeSet, options: ProfileOptions) -> Profile:
    """Capture and fit one loaded model on given probes."""
    length = probes.length
    info = loaded.info
    if info.max_positions and length > info.max_positions:
        raise AttnprofError(f"probe length {length} exceeds {info.name}'s max positions ({info.max_positions})")
    window = options.window or cap.default_window(length)
    if not 1 <= window < length:
        raise AttnprofError(f"window {window} must be between 1 and the probe length {length}")
    model = loaded.model
    if options.estimator == "taf":
        steps = len([d for d in cap.TAF_DISTANCES if d + cap.TAF_PREFIX <= length]) * probes.num
        advance, close = progress_bar(steps, f"TAF protocol {info.name}", options.quiet)
        curves = cap.capture_taf(model, probes.input_ids, progress=advance)
    elif options.estimator in ("tail", "dense"):
        advance, close = progress_bar(probes.num, f"profiling {info.name}", options.quiet)
        curves = cap.capture(model, probes.input_ids, window=window, estimator=options.estimator,
                             progress=advance)
        d_max = length - window
    else:
        raise AttnprofError(f"unknown estimator {options.estimator!r} (tail, dense, taf)")
    close()
    model_dict = dict(vars(info))
    probes_dict = {**probes.describe(), "window": window if options.estimator != "taf" else 1,
                   "estimator": options.estimator, "fingerprint": fingerprint(probes.input_ids)}
    if options.estimator == "taf":
        setup = FitSetup.points(curves.distances[curves.distances >= cap.TAF_FIT_D_MIN], probes.num,
                                options.seed)
    else:
        setup = FitSetup.make(d_max, probes.num, options.seed)
    return build_profile(curves, probes.input_ids, model_dict, probes_dict, setup)


def release(loaded: LoadedModel | None) -> None:
    """Drop a model and give its memory back before the next one is loaded."""
    if loaded is not None:
        loaded.model = None
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def profile(model: Any, tokenizer: Any = None, **kwargs: Any) -> Profile:
    """Profile one model: a path / hub id / .gguf / "smollm2-135m", or an already-loaded
    transformers causal LM (then pass its tokenizer). Keyword arguments are ProfileOptions fields.

    >>> p = profile("smollm2-135m", length=512, num=2)      # doctest: +SKIP
    >>> p.to_frame().groupby("regime").gamma.describe()      # doctest: +SKIP
    """
    options = ProfileOptions(**kwargs)
    cap.register()
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        loaded = load_model(str(model), attn_implementation=cap.ATTN_NAME, **options.load_kwargs())
        try:
            probes = make_probes(loaded.tokenizer, options, loaded.info.max_positions)
            return capture_loaded(loaded, probes, options)
        finally:
            release(loaded)
    return profile_model_object(model, tokenizer, options)


def profile_model_object(model: Any, tokenizer: Any, options: ProfileOptions) -> Profile:
    """Profile an in-memory transformers model, restoring its attention implementation after."""
    from .load import ModelSource, model_info
    if tokenizer is None:
        raise AttnprofError("profiling a model object needs its tokenizer: profile(model, tokenizer)")
    previous = model.config._attn_implementation
    name = str(getattr(model.config, "name_or_path", "") or type(model).__name__).rstrip("/").split("/")[-1]
    info = model_info(model.config, name, "in-memory model", str(next(model.parameters()).dtype))
    loaded = LoadedModel(model, tokenizer, info, ModelSource("object", None, name, name))  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    model.set_attn_implementation(cap.ATTN_NAME)
    try:
        probes = make_probes(tokenizer, options, info.max_positions)
        return capture_loaded(loaded, probes, options)
    finally:
        model.set_attn_implementation(previous)
        model.train(was_training)
