"""The `attnprof` command line. Exit codes: 0 ok / gate passed, 1 gate failed, 2 bad input or error.

    attnprof profile MODEL [options]
    attnprof profile BASE vs MERGED [options]
    attnprof check-adapter ADAPTER [--base BASE] [--json]
    attnprof report RUN_DIR
    attnprof demo [--quick]
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import warnings
from pathlib import Path

from .errors import AttnprofError, first_line
from .rules import GateThresholds

EXIT_OK, EXIT_REGRESSION, EXIT_ERROR = 0, 1, 2
# options that only mean something for BASE vs MERGED: given with one model, they are refused
GATE_OPTIONS = ("max_model_dgamma", "max_shifted_heads", "max_regime_flips")
DIFF_ONLY = (*GATE_OPTIONS, "targets", "adapter_rank", "merged_load_in_4bit")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        raise AttnprofError(f"{message} (see `{self.prog} --help`)")


def rank(text: str) -> int:
    """argparse type of --adapter-rank (its name is in argparse's "invalid rank value")."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def _add_profile_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("probes and capture")
    g.add_argument("--probes", default="text:stdlib,random", metavar="SUITE",
                   help="comma-separated sources: random, repeat, text:stdlib, code:stdlib, file:PATH, "
                        "jsonl:PATH:FIELD (default: text:stdlib,random)")
    g.add_argument("--length", type=int, default=None, metavar="T",
                   help="probe length in tokens (default 2048, capped at the model's max positions)")
    g.add_argument("--num", type=int, default=8, metavar="N", help="number of probes (default 8)")
    g.add_argument("--seed", type=int, default=0, help="probe and bootstrap seed (default 0)")
    g.add_argument("--window", type=int, default=None, metavar="W",
                   help="tail-window size: queries in [T-W, T) (default min(256, T/8))")
    g.add_argument("--estimator", choices=("tail", "dense", "taf"), default="tail",
                   help="tail (default), dense (all queries, uniform-normalised; Triton on CUDA), "
                        "taf (TAF diagnose protocol, for comparison with published numbers)")
    g.add_argument("--allow-truncate", action="store_true",
                   help="cap a --length above the model's max positions instead of refusing")
    m = p.add_argument_group("model loading")
    m.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    m.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 "
                                                   "(auto: float32 on CPU, bfloat16 on CUDA)")
    quantised = m.add_mutually_exclusive_group()        # one quantisation per model
    quantised.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 + double quant, bf16 compute")
    quantised.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes int8")
    quantised.add_argument("--merged-load-in-4bit", action="store_true",
                           help="load only MERGED in 4-bit: `profile M vs M --merged-load-in-4bit` shows what "
                                "quantisation alone does to the profile")
    m.add_argument("--device-map", default=None, help="accelerate device map, e.g. auto (multi-GPU)")
    gate = p.add_argument_group("gate (base vs merged)")
    defaults = GateThresholds()
    # default None, so that a threshold given with one model is refused, not silently unused
    gate.add_argument("--max-model-dgamma", type=float, default=None,
                      help=f"largest allowed |model-level Δgamma| (default {defaults.max_model_dgamma})")
    gate.add_argument("--max-shifted-heads", type=float, default=None,
                      help=f"largest allowed fraction of shifted heads (default {defaults.max_shifted_heads})")
    gate.add_argument("--max-regime-flips", type=float, default=None,
                      help=f"largest allowed fraction of regime changes (default {defaults.max_regime_flips})")
    w = p.add_argument_group("weight diff (base vs a merged checkpoint)")
    w.add_argument("--targets", default=None, metavar="MODULES",
                   help="the merged adapter's target modules, comma-separated (e.g. q_proj,v_proj): "
                        "changes elsewhere are flagged")
    w.add_argument("--adapter-rank", type=rank, default=None, metavar="R",
                   help="the merged adapter's rank: a ΔW rank well above it is flagged")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="DIR", help="run directory (default reports/<name>/)")
    o.add_argument("--json", action="store_true", help="print profile.json / diff.json to stdout")
    o.add_argument("--no-report", action="store_true", help="skip the HTML/PNG report")
    o.add_argument("--no-weights", action="store_true", help="skip the weight diff")
    o.add_argument("--quiet", action="store_true", help="no progress bars or summary on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attnprof", description="Did the fine-tune change how the model attends "
                                                  "across distance? Attention distance profiles, base vs merged.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("profile", help="profile one model, or BASE vs MERGED",
                       usage="attnprof profile MODEL [options]\n       attnprof profile BASE vs MERGED [options]")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="a local HF dir, a cached hub id, a .gguf file, a PEFT adapter dir (as MERGED), "
                        "or smollm2-135m (the bundled demo model)")
    _add_profile_options(p)
    c = sub.add_parser("check-adapter", help="check an adapter_config.json against a base, from configs alone")
    c.add_argument("adapter", metavar="ADAPTER", help="adapter_config.json, an adapter dir, or a cached hub id")
    c.add_argument("--base", default=None, help="a local model dir, a cached hub id, or a config.json")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    r = sub.add_parser("report", help="re-render the HTML/PNG report of a stored run")
    r.add_argument("run_dir", metavar="RUN_DIR")
    d = sub.add_parser("demo", help="build the demo fine-tunes and run base vs each")
    d.add_argument("--quick", action="store_true", help="smaller training batches, shorter and fewer probes (≤ 3 minutes)")
    d.add_argument("--out", default="reports", metavar="DIR", help="where the demo runs go (default reports/)")
    d.add_argument("--quiet", action="store_true")
    return parser


def _options(args):
    from .run import ProfileOptions
    return ProfileOptions(probes=args.probes, length=args.length, num=args.num, seed=args.seed,
                          window=args.window, estimator=args.estimator, device=args.device,
                          dtype=args.dtype, allow_truncate=args.allow_truncate,
                          load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit,
                          device_map=args.device_map, quiet=args.quiet)


def _safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in Path(text.rstrip("/")).name) or "model"


def cmd_profile(args, command: str) -> int:
    from dataclasses import replace

    from . import run
    from .io import check_run_dir
    from .profiles import terminal_summary
    from .sources import resolve_source

    models = args.models
    options = _options(args)
    if len(models) == 1:
        given = [f"--{name.replace('_', '-')}" for name in DIFF_ONLY
                 if getattr(args, name) is not None and getattr(args, name) is not False]   # 0 is given
        if given:
            raise AttnprofError(f"{', '.join(given)}: only for two models, `attnprof profile BASE vs MERGED`"
                                + (" (for one model in 4-bit, --load-in-4bit)" if args.merged_load_in_4bit else ""))
        source = resolve_source(models[0])
        shown = Path(args.out or Path("reports") / _safe_name(source.name))
        out = check_run_dir(shown)                      # before any work
        profile = run.profile(source.spec, **vars(options))
        run.write_run(out, command=command, profile=profile, render=not args.no_report, seed=args.seed)
        if args.json:
            sys.stdout.write(profile.to_json())
        elif not args.quiet:
            print(terminal_summary(profile), file=sys.stderr)
            print(f"wrote {shown}/", file=sys.stderr)
        return EXIT_OK
    if len(models) != 3 or models[1] != "vs":
        raise AttnprofError("expected `attnprof profile MODEL` or `attnprof profile BASE vs MERGED`")
    base, merged = models[0], models[2]
    if args.no_weights and (args.targets or args.adapter_rank is not None):
        raise AttnprofError("--targets and --adapter-rank describe the weight diff, which --no-weights skips")
    thresholds = GateThresholds(**{name: getattr(args, name) for name in GATE_OPTIONS
                                   if getattr(args, name) is not None})
    merged_options = replace(options, load_in_4bit=True) if args.merged_load_in_4bit else options
    shown = Path(args.out or Path("reports") / f"{_safe_name(base)}-vs-{_safe_name(merged)}")
    out = check_run_dir(shown)
    with tempfile.TemporaryDirectory(prefix="attnprof-") as work:
        targets = args.targets.split(",") if args.targets else None
        result = run.compare(base, merged, options, thresholds, merged_options, workdir=work,
                             with_weights=not args.no_weights, target_modules=targets,
                             adapter_rank=args.adapter_rank)
        run.write_run(out, command=command, comparison=result, render=not args.no_report, seed=args.seed)
    diff = result.diff
    if args.json:
        sys.stdout.write(diff.to_json())
    elif not args.quiet:
        print(terminal_summary(result.base), file=sys.stderr)
        print(terminal_summary(result.merged), file=sys.stderr)
        print(diff_summary(diff), file=sys.stderr)
        print(f"wrote {shown}/", file=sys.stderr)
    return diff.verdict_result.exit_code


def diff_summary(diff) -> str:
    lo, hi = diff.model_dgamma_ci
    lines = [f"verdict: {diff.verdict.upper()} ({'; '.join(diff.reasons)})",
             f"  model Δgamma {diff.model_dgamma:+.4f}  95% CI [{lo:+.4f}, {hi:+.4f}]",
             f"  shifted heads {diff.shifted_heads} ({diff.shifted_fraction:.1%}), regime flips "
             f"{diff.regime_flips} ({diff.regime_flip_fraction:.1%}), mean JS {diff.js_mean:.2e}"]
    sure, possible = diff.shifted_heads_range
    lines.append(f"  within the CIs: {sure} heads shifted beyond doubt, {possible} possibly"
                 + ("; BORDERLINE: at the CIs' ends the verdict would go either way" if diff.borderline else ""))
    for f in diff.flags:
        lines.append(f"  [{f['severity']}] {f['code']}: {f['message']}")
    return "\n".join(lines)


def cmd_check_adapter(args) -> int:
    from .adapter import run_check_adapter
    return run_check_adapter(args.adapter, args.base, args.json)


def cmd_report(args) -> int:
    from .report import render_report
    path = render_report(args.run_dir)
    print(path)
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(out=Path(args.out), quick=args.quick, quiet=args.quiet)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings as one line; libraries' deprecation chatter only with ATTNPROF_DEBUG."""
    if os.environ.get("ATTNPROF_DEBUG") or f"{os.sep}profiler{os.sep}" in str(filename):
        print(f"attnprof: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = "attnprof " + " ".join(shlex.quote(a) for a in argv)
    warnings.showwarning = _warning_line
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "quiet", False):
            # libraries' own bars too (transformers' GGUF conversion): tqdm reads this when it is
            # first imported, which is below
            os.environ.setdefault("TQDM_DISABLE", "1")
        from .run import quiet_libraries
        quiet_libraries()
        handlers = {"profile": lambda: cmd_profile(args, command), "check-adapter": lambda: cmd_check_adapter(args),
                    "report": lambda: cmd_report(args), "demo": lambda: cmd_demo(args)}
        return handlers[args.command]()
    except AttnprofError as exc:
        print(f"attnprof: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("attnprof: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen library failure: still one line, still exit 2
        if os.environ.get("ATTNPROF_DEBUG"):
            raise
        print(f"attnprof: error: {type(exc).__name__}: {first_line(exc)} "
              "(set ATTNPROF_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
