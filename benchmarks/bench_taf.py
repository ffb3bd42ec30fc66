"""TAF diagnose protocol vs attnprof's tail capture: time to the same model-level gamma CI width.

Measured, not projected. First the tail capture profiles N probes of T tokens (the target:
its model-level 95 % CI half-width, and its time). Then the TAF protocol (distances 10…2000,
the last query, d+50 tokens, one forward pass per distance) runs on fresh prompts from the same
suite in batches; after every batch its model-level CI is recomputed over all prompts so far,
with the same bootstrap. It stops when its half-width is at or below the target (the ratio of
the two times is then measured), or once TAF has spent --max-ratio times the tail capture's
time without getting there (the ratio is then measured to be above that bound). Both sides use
the same model, the same attention implementation (attnprof's streaming capture, cheaper than
eager hooks) and the same corpus; times are capture plus fit. Every checkpoint is printed, with
the 1/√n projection from all of them for scale.

    python benchmarks/bench_taf.py --length 2048 --num 16 --batch 32 --max-ratio 30
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from profiler import capture as cap  # noqa: E402
from profiler import fit  # noqa: E402
from profiler.load import load_model  # noqa: E402
from profiler.probes import build_probes  # noqa: E402
from profiler.profiles import FitSetup, model_level_fit  # noqa: E402
from profiler.rules import FIT_SINK_MARGIN  # noqa: E402


def model_level_ci(curves: cap.Capture, setup_for: Callable[[int], FitSetup]) -> tuple[float, float, float]:
    """Model-level gamma and its bootstrap CI, as the profile computes them (heads skipped)."""
    setup = setup_for(curves.A.shape[0])
    model, (lo, hi) = model_level_fit(fit.bin_profile(curves.A, setup.bins, curves.distances), setup)
    return float(model["gamma"]), float(lo), float(hi)


def concat(parts: list[cap.Capture]) -> cap.Capture:
    """One Capture from per-batch Captures (probes stacked)."""
    return cap.Capture(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in cap.STAT_FIELDS},
                       distances=parts[0].distances)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--probes", default="text:stdlib")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--num", type=int, default=16, help="tail-capture probes (sets the target CI)")
    ap.add_argument("--batch", type=int, default=32, help="TAF prompts between CI checks")
    ap.add_argument("--max-prompts", type=int, default=4096)
    ap.add_argument("--max-ratio", type=float, default=30.0,
                    help="stop once TAF has taken this many times the tail capture's time")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    cap.register()
    loaded = load_model(args.model, attn_implementation=cap.ATTN_NAME, device=args.device, dtype="auto")
    model = loaded.model
    window = cap.default_window(args.length)

    probes = build_probes(args.probes, loaded.tokenizer, args.length, args.num, seed=0)
    cap.capture(model, probes.input_ids[:1, :256], window=64)                 # warm-up
    t0 = time.perf_counter()
    tail = cap.capture(model, probes.input_ids, window=window)
    def tail_setup(num: int) -> FitSetup:
        return FitSetup.make(args.length - window - FIT_SINK_MARGIN, num, 0)

    gamma, lo, hi = model_level_ci(tail, tail_setup)
    tail_seconds = time.perf_counter() - t0
    target = (hi - lo) / 2
    print(f"tail capture: T={args.length}, N={args.num}: gamma {gamma:.3f} [{lo:.3f}, {hi:.3f}], "
          f"half-width ±{target:.4f}, {tail_seconds:.1f} s", flush=True)

    # fresh prompts for TAF (another seed), long enough for the whole protocol: d up to 2000
    taf_length = max(cap.TAF_DISTANCES) + cap.TAF_PREFIX
    pool = build_probes(args.probes, loaded.tokenizer, taf_length, args.max_prompts, seed=1)
    fitted = cap.taf_fit_distances(np.array(cap.TAF_DISTANCES))

    def taf_setup(num: int) -> FitSetup:
        return FitSetup.points(fitted, num, 0)

    taf_parts: list[cap.Capture] = []
    checkpoints, capture_seconds, reached = [], 0.0, None
    for start in range(0, args.max_prompts, args.batch):
        t = time.perf_counter()
        taf_parts.append(cap.capture_taf(model, pool.input_ids[start:start + args.batch]))
        capture_seconds += time.perf_counter() - t
        curves = concat(taf_parts)
        t = time.perf_counter()
        g, l, h = model_level_ci(curves, taf_setup)
        fit_seconds = time.perf_counter() - t
        n = curves.A.shape[0]
        row = {"prompts": n, "capture_seconds": capture_seconds, "fit_seconds": fit_seconds,
               "gamma": g, "ci": [l, h], "half_width": (h - l) / 2}
        checkpoints.append(row)
        print(f"  TAF {n:5d} prompts: gamma {g:.3f} [{l:.3f}, {h:.3f}] ±{row['half_width']:.4f}  "
              f"{capture_seconds:7.1f} s", flush=True)
        # a bootstrap over a handful of prompts has few distinct resamples (one prompt: a zero-width
        # "CI"), so a crossing counts only once TAF has at least as many prompts as the tail side
        if n >= args.num and row["half_width"] <= target:
            reached = row
            break
        if capture_seconds + fit_seconds > args.max_ratio * tail_seconds:
            break

    # the 1/√n trend over all checkpoints: half-width ≈ c / √n, c fitted in log space (slope fixed)
    usable = [c for c in checkpoints if c["prompts"] >= args.num and c["half_width"] > 0] or checkpoints[-1:]
    ns = np.array([c["prompts"] for c in usable], float)
    hws = np.array([c["half_width"] for c in usable], float)
    c = float(np.exp(np.mean(np.log(np.maximum(hws, 1e-12)) + 0.5 * np.log(ns))))
    trend_prompts = (c / target) ** 2
    per_prompt = capture_seconds / checkpoints[-1]["prompts"]
    summary = {"length": args.length, "num": args.num, "tail_seconds": tail_seconds, "tail_gamma": gamma,
               "tail_ci": [lo, hi], "target_half_width": target, "taf_seconds_per_prompt": per_prompt,
               "trend_prompts": trend_prompts, "checkpoints": checkpoints}
    if reached:
        taf_seconds = reached["capture_seconds"] + reached["fit_seconds"]
        summary.update(reached_prompts=reached["prompts"], taf_seconds=taf_seconds,
                       ratio=taf_seconds / tail_seconds)
        print(f"TAF reached ±{target:.4f} after {reached['prompts']} prompts, {taf_seconds:.0f} s = "
              f"{taf_seconds / tail_seconds:.1f}× the tail capture's {tail_seconds:.1f} s")
    else:
        spent = checkpoints[-1]["capture_seconds"] + checkpoints[-1]["fit_seconds"]
        summary.update(taf_seconds=spent, ratio_above=spent / tail_seconds)
        print(f"TAF had not reached ±{target:.4f} after {checkpoints[-1]['prompts']} prompts, {spent:.0f} s = "
              f"{spent / tail_seconds:.1f}× the tail capture's {tail_seconds:.1f} s: the ratio is above that "
              f"(its CI was still ±{checkpoints[-1]['half_width']:.4f}, "
              f"{checkpoints[-1]['half_width'] / target:.1f}× wider)")
    print(f"1/√n trend over {len(ns)} checkpoints: ≈{trend_prompts:.0f} prompts ≈ "
          f"{trend_prompts * per_prompt:.0f} s = {trend_prompts * per_prompt / tail_seconds:.1f}× the tail capture")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
