"""Run: the stages glued together — load, probes, capture, fit — for the CLI and the Python API.

`profile()` returns a `Profile` for one model; `compare()` (in diff.py's terms) profiles base and
merged on identical token ids. Models are loaded one at a time and released before the next.
"""
from __future__ import annotations

import contextlib
import gc
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from . import capture as cap
from . import rules
from .errors import AttnprofError
from .load import LoadedModel, load_model
from .probes import DEFAULT_SUITE, MIN_PROBE_LENGTH, ProbeSet, build_probes, fingerprint
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


QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
QUIET_LOGGERS = ("bitsandbytes", "peft", "accelerate")


def quiet_libraries() -> None:
    """Silence transformers' progress bars and advice, and peft/bitsandbytes/accelerate chatter,
    so only attnprof's own messages reach the terminal, and force offline mode for the hub
    (attnprof never downloads). For the CLI's whole process; the API uses `quieted`."""
    import logging
    import os

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


# transformers' GGUF conversion draws a plain tqdm bar, which disable_progress_bar() does not
# reach and TQDM_DISABLE reaches only before tqdm is first imported (the CLI sets it then)
GGUF_BAR_MODULE = "transformers.modeling_gguf_pytorch_utils"


@contextlib.contextmanager
def quieted(quiet: bool = True) -> Iterator[None]:
    """`quiet_libraries` for the length of one API call: the caller's environment, log levels,
    progress bars and warning filters are as they were afterwards."""
    if not quiet:
        yield
        return
    import functools
    import importlib
    import logging
    import os

    from transformers.utils import logging as hf_logging
    env = {key: os.environ.get(key) for key in QUIET_ENV}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    gguf_utils = importlib.import_module(GGUF_BAR_MODULE)
    gguf_bar = gguf_utils.tqdm
    with warnings.catch_warnings():
        quiet_libraries()
        gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
        try:
            yield
        finally:
            gguf_utils.tqdm = gguf_bar
            for key, value in env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            hf_logging.set_verbosity(verbosity)
            (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


MIN_PROBES_FOR_CI = 4
MIN_LENGTH = max(MIN_PROBE_LENGTH, rules.FIT_D_MIN + rules.FIT_SINK_MARGIN + 2)   # T − W − 8 > 16 with W ≥ 1


def resolve_length(requested: int | None, max_positions: int | None, allow_truncate: bool) -> int:
    """The probe length: the default is capped at max positions with a warning; an explicit length
    above max positions is refused unless allow_truncate."""
    if requested is not None and requested < MIN_LENGTH:
        raise AttnprofError(f"--length {requested}: probes need at least {MIN_LENGTH} tokens (the fit needs "
                            f"distances from {rules.FIT_D_MIN} to T − W − {rules.FIT_SINK_MARGIN})")
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


def resolve_window(options: ProfileOptions, length: int) -> int:
    """The tail window for a probe length, refused (before any model runs) where it leaves the
    fit no distances; the TAF protocol has no window (one query per prompt)."""
    if options.estimator == "taf":
        if options.window is not None:
            raise AttnprofError("--window does not apply to --estimator taf (its fit uses the last query only)")
        return 1
    window = cap.default_window(length) if options.window is None else options.window
    cap.check_window(window, length, "--window")
    farthest = length - window - rules.FIT_SINK_MARGIN
    if farthest <= rules.FIT_D_MIN:
        given = options.window is not None
        raise AttnprofError(f"{'--window' if given else 'the default window'} {window} at probe length {length} "
                            f"leaves the fit no distances: the farthest fitted distance T − W − "
                            f"{rules.FIT_SINK_MARGIN} = {farthest} must exceed {rules.FIT_D_MIN}; use "
                            + ("a smaller --window or " if given else "") + "a longer --length")
    return window


def make_probes(tokenizer, options: ProfileOptions, max_positions: int | None) -> ProbeSet:
    if options.seed < 0:
        raise AttnprofError(f"--seed {options.seed}: the seed must be ≥ 0")
    length = resolve_length(options.length, max_positions, options.allow_truncate)
    resolve_window(options, length)                  # a bad window fails here, before any model loads
    probes = build_probes(options.probes, tokenizer, length, options.num, options.seed)
    if options.num < MIN_PROBES_FOR_CI:
        warnings.warn(f"{options.num} probe(s): the bootstrap over probes has few distinct resamples, "
                      f"so confidence intervals are coarse (use --num {MIN_PROBES_FOR_CI * 2} or more)")
    return probes


def capture_loaded(loaded: LoadedModel, probes: ProbeSet, options: ProfileOptions) -> Profile:
    """Capture and fit one loaded model on given probes."""
    length = probes.length
    info = loaded.info
    if info.max_positions and length > info.max_positions:
        raise AttnprofError(f"probe length {length} exceeds {info.name}'s max positions ({info.max_positions})")
    window = resolve_window(options, length)
    model = loaded.model
    if options.estimator == "taf":
        steps = len([d for d in cap.TAF_DISTANCES if d + cap.TAF_PREFIX <= length]) * probes.num
        advance, close = progress_bar(steps, f"TAF protocol {info.name}", options.quiet)
        curves = cap.capture_taf(model, probes.input_ids, progress=advance)
    elif options.estimator in ("tail", "dense"):
        advance, close = progress_bar(probes.num, f"profiling {info.name}", options.quiet)
        curves = cap.capture(model, probes.input_ids, window=window, estimator=options.estimator,
                             progress=advance)
        d_max = length - window - rules.FIT_SINK_MARGIN
    else:
        raise AttnprofError(f"unknown estimator {options.estimator!r} (tail, dense, taf)")
    close()
    model_dict = dict(vars(info))
    probes_dict = {**probes.describe(), "window": window,
                   "estimator": options.estimator, "fingerprint": fingerprint(probes.input_ids),
                   "capture": "eager weights" if curves.path == "hooks" else "streamed"}
    if options.estimator == "taf":
        setup = FitSetup.points(cap.taf_fit_distances(curves.distances), probes.num, options.seed)
    else:
        setup = FitSetup.make(d_max, probes.num, options.seed)
    if len(setup.bins.lo) < rules.FIT_MIN_BINS:
        warnings.warn(f"the fit has {len(setup.bins.lo)} distance bin(s) at T = {length}: every fit passes "
                      "near them, so R², regimes and CIs say little (use a longer --length)")
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
    with quieted(options.quiet):
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
    """Profile an in-memory transformers model as it is (device, dtype, quantisation), restoring
    its attention implementation and every module's train/eval mode after."""
    from .load import ModelSource, model_info
    if tokenizer is None:
        raise AttnprofError("profiling a model object needs its tokenizer: profile(model, tokenizer)")
    defaults = ProfileOptions()
    moved = [f for f in ("device", "dtype", "load_in_4bit", "load_in_8bit", "device_map")
             if getattr(options, f) != getattr(defaults, f)]
    if moved:
        raise AttnprofError(f"{', '.join(moved)}: loading options, for models attnprof loads; a model object is "
                            "profiled where and as it is (move or quantise it first)")
    cap.register()
    previous = model.config._attn_implementation
    name = str(getattr(model.config, "name_or_path", "") or type(model).__name__).rstrip("/").split("/")[-1]
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    info = model_info(model.config, name, "in-memory model", dtype)
    loaded = LoadedModel(model, tokenizer, info, ModelSource("object", None, name, name))  # type: ignore[arg-type]
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    model.set_attn_implementation(cap.ATTN_NAME)
    try:
        probes = make_probes(tokenizer, options, info.max_positions)
        return capture_loaded(loaded, probes, options)
    finally:
        model.set_attn_implementation(previous)
        for module, training in modes:
            module.training = training


# --- base vs merged ---------------------------------------------------------------------------

@dataclass
class Comparison:
    """The three results of `attnprof profile BASE vs MERGED`."""
    base: Profile
    merged: Profile
    diff: "ProfileDiff"
    merged_dir: Any = None          # where the merged weights live on disk (for the weight diff)


def _config_info(source) -> Any:
    from .load import load_config, model_info
    return model_info(load_config(source), source.name, source.spec)


def check_same_architecture(b, merged_source) -> None:
    """Refuse, before any weight is loaded, to compare models of different shapes (b: base ModelInfo)."""
    m = _config_info(merged_source)
    if b.architecture != m.architecture:
        raise AttnprofError(f"base and merged have different architectures ({b.architecture} vs {m.architecture})")
    for key, what in (("num_layers", "layer counts"), ("num_heads", "head counts"),
                      ("num_kv_heads", "key/value head counts"), ("head_dim", "head dims")):
        if getattr(b, key) != getattr(m, key):
            raise AttnprofError(f"base and merged have different {what} ({getattr(b, key)} vs {getattr(m, key)})")


def compare(base: str, merged: str, options: ProfileOptions | None = None,
            thresholds: Any = None, merged_options: ProfileOptions | None = None,
            workdir: Any = None, with_weights: bool = True,
            base_profile: Profile | None = None, target_modules: Any = None,
            adapter_rank: int | None = None, **option_fields: Any) -> Comparison:
    """Profile BASE and MERGED on identical token ids, diff profiles and weights, give a verdict.

    MERGED may be a PEFT adapter directory: it is merged onto BASE with peft (and, for the weight
    diff, saved into `workdir`: by default a temporary directory, removed before returning, and
    `Comparison.merged_dir` is then None). `merged_options` lets the merged side load differently (e.g.
    in 4-bit to see what quantisation alone does); by default both sides use `options`.
    `base_profile`, from an earlier compare() with the same options, skips re-profiling BASE.
    `target_modules` / `adapter_rank` tell the weight diff what a merged checkpoint's adapter
    was (an adapter directory says so itself). Keyword arguments are ProfileOptions fields (as for
    `profile`), when no `options` are given.
    """
    if options is not None and option_fields:
        raise AttnprofError("compare(): give ProfileOptions or its fields as keywords, not both")
    options = options or ProfileOptions(**option_fields)
    from pathlib import Path
    with quieted(options.quiet), contextlib.ExitStack() as cleanup:
        temporary = workdir is None
        if temporary:
            import tempfile
            workdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="attnprof-merge-"))
        result = _compare(base, merged, options, thresholds, merged_options, workdir, with_weights,
                          base_profile, target_modules, adapter_rank)
        if temporary and result.merged_dir is not None and Path(result.merged_dir).is_relative_to(workdir):
            result.merged_dir = None
        return result


def _compare(base: str, merged: str, options: ProfileOptions, thresholds: Any,
             merged_options: ProfileOptions | None, workdir: Any, with_weights: bool,
             base_profile: Profile | None, target_modules: Any, adapter_rank: int | None) -> Comparison:
    from pathlib import Path

    from .diff import diff_profiles
    from .load import load_model, load_tokenizer
    from .probes import tokenizers_agree
    from .rules import GateThresholds
    from .sources import resolve_source

    merged_options = merged_options or options
    thresholds = thresholds or GateThresholds()
    cap.register()
    base_source, merged_source = resolve_source(base), resolve_source(merged)
    if base_source.kind == "adapter":
        raise AttnprofError(f"{base}: BASE must be a model, not an adapter")
    is_adapter = merged_source.kind == "adapter"
    base_info = _config_info(base_source)
    if is_adapter:
        check_adapter_fits(merged_source, base_source)
    else:
        check_same_architecture(base_info, merged_source)

    if with_weights and base_source.kind in ("dir", "demo"):      # a --targets typo fails before any capture
        from .weights import check_target_modules
        check_target_modules(base_source.path, target_modules)

    # probes come from the base tokenizer; both tokenizers must agree on them before any capture
    base_tokenizer = load_tokenizer(base_source)
    has_own_tokenizer = not is_adapter or any(merged_source.path.glob("tokenizer*.json"))
    merged_tokenizer = load_tokenizer(merged_source) if has_own_tokenizer else base_tokenizer
    if base_profile is None:
        probes = make_probes(base_tokenizer, options, base_info.max_positions)
    else:
        probes = ProbeSet(base_profile.probes["suite"], base_profile.probes["length"],
                          base_profile.probes["num"], base_profile.probes["seed"], base_profile.input_ids,
                          tuple(base_profile.probes["sources"]))
    problem = tokenizers_agree(base_tokenizer, merged_tokenizer, probes)
    if problem:
        raise AttnprofError(f"base and merged tokenizers disagree on the probes: {problem}")

    if base_profile is None:
        loaded = load_model(base_source, attn_implementation=cap.ATTN_NAME, **options.load_kwargs())
        try:
            base_profile = capture_loaded(loaded, probes, options)
        finally:
            release(loaded)

    merged_dir = merged_source.path if merged_source.kind in ("dir", "demo") else None
    # merged into a 4-/8-bit base, the saved weights are packed codes: no weight diff against floats
    quantised_merge = is_adapter and (merged_options.load_in_4bit or merged_options.load_in_8bit)
    loaded = load_model(merged_source, attn_implementation=cap.ATTN_NAME, base=base_source,
                        **merged_options.load_kwargs())
    try:
        merged_profile = capture_loaded(loaded, probes, merged_options)
        if (is_adapter and with_weights and not quantised_merge and base_source.kind in ("dir", "demo")
                and workdir is not None):
            merged_dir = Path(workdir) / "merged-weights"
            loaded.model.save_pretrained(merged_dir)
    finally:
        release(loaded)

    result = diff_profiles(base_profile, merged_profile, thresholds, seed=options.seed)
    if with_weights:
        summary, weight_flags = weight_section(base_source, merged_dir, merged_source if is_adapter else None,
                                               options.quiet, target_modules, adapter_rank,
                                               quantised_merge=quantised_merge)
        if summary is not None:
            result.weights = summary.pop("tensors")
            result.weights_summary = summary
        result.flags.extend(weight_flags)
    if is_adapter:
        result.adapter = adapter_section(merged_source, base_source)
    return Comparison(base_profile, merged_profile, result, merged_dir)


def check_adapter_fits(adapter_source, base_source) -> None:
    """An adapter whose base does not fit is bad input (exit 2), found before loading weights."""
    from .adapter import check_adapter
    report = check_adapter(str(adapter_source.path), str(base_source.path))
    errors = [f for f in report.findings if f.severity == "error"]
    if errors:
        raise AttnprofError(f"adapter {adapter_source.spec} does not fit base {base_source.spec}: "
                            f"{errors[0].message}")


def adapter_section(adapter_source, base_source) -> dict[str, Any]:
    from .adapter import check_adapter, load_adapter_config
    config = load_adapter_config(str(adapter_source.path))
    check = check_adapter(str(adapter_source.path), str(base_source.path))
    return {"config": config, "check": check.to_dict()}


def weight_section(base_source, merged_dir, adapter_source, quiet: bool, target_modules: Any = None,
                   adapter_rank: int | None = None, quantised_merge: bool = False) -> tuple[dict | None, list[dict]]:
    """The streamed weight diff, or a flag saying why it was skipped."""
    if quantised_merge:
        return None, [{"code": "weights_not_diffed", "severity": "info",
                       "message": "weights were not diffed: the adapter was merged into a 4-/8-bit base, whose "
                                  "weights are stored as packed codes; profile without the 4-/8-bit option for "
                                  "the adapter's weight diff"}]
    if base_source.kind not in ("dir", "demo") or merged_dir is None:
        return None, [{"code": "weights_not_diffed", "severity": "info",
                       "message": "weights were not diffed: both sides must be safetensors directories "
                                  "(a .gguf side is profiled but not diffed)"}]
    from .weights import diff_weights
    adapter_dir = adapter_source.path if adapter_source is not None else None
    wd = diff_weights(base_source.path, merged_dir, adapter_dir=adapter_dir, target_modules=target_modules,
                      adapter_rank=adapter_rank, progress=not quiet)
    data = wd.to_dict()
    if adapter_source is not None:
        # merged into a temporary directory for the diff: name what it was, not where it was
        data["merged"] = f"{adapter_source.spec} merged onto {base_source.spec} by peft"
    return data, list(data.pop("flags", []))


# --- run directories ------------------------------------------------------------------------

def write_run(out: Any, *, command: str, profile: Profile | None = None,
              comparison: Comparison | None = None, render: bool = True, seed: int = 0) -> Any:
    """Write a run directory atomically: JSON + npz, run.json with hashes, summary and report."""
    from .io import atomic_dir, check_run_dir, sha256
    from .profiles import versions, write_json
    from .results import dumps

    out = check_run_dir(out)
    with atomic_dir(out) as tmp:
        if comparison is not None:
            for side, prof in (("base", comparison.base), ("merged", comparison.merged)):
                (tmp / side).mkdir()
                prof.save(tmp / side)
            (tmp / "diff.json").write_text(dumps(comparison.diff.to_dict()), encoding="utf-8")
            kind = "pair"
        elif profile is not None:
            profile.save(tmp)
            kind = "single"
        else:
            raise ValueError("write_run needs a profile or a comparison")
        files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / "run.json", {"kind": kind, "command": command, "versions": versions(),
                                      "files": files, "seed": seed})
        from .report import load_run, render_report, summary_markdown
        data = load_run(tmp, verify=False)          # its files were hashed a moment ago
        (tmp / "summary.md").write_text(summary_markdown(data), encoding="utf-8")   # for CI logs
        if render:
            render_report(data)
    return out
