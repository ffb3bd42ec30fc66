"""Capture cost, side by side on the same model and the same probes, at several lengths.

Methods, each in its own child process (so peak memory is its own, under a memory budget):
  plain   the model's forward pass with SDPA attention (the baseline)
  tail    attnprof's tail-window capture (the default estimator)
  dense   attnprof's dense capture (Triton kernel on CUDA, chunked torch on CPU)
  hooks   the usual way: eager attention with output_attentions=True, every T×T map kept
  taf     the TAF diagnose protocol (distances 10…2000, last query, d+50 tokens, one forward each)
  paired  plain, tail and dense forwards interleaved probe by probe in one process (the fairest
          ratios; the seconds column is all of them together); on CUDA also tail-layer and
          dense-layer, the captures with each layer reduced on its own instead of in batches, and
          dense-sdpa, the dense batches with SDPA attention and pass 1 in the batch launch
All forward passes compute logits for the last position only (logits_to_keep=1), the same for all.
Times exclude model loading; peak memory is the process's high-water RSS (or CUDA peak) during
the timed part. TAF is also reported as the projected time to reach the tail estimator's
model-level gamma CI half-width (half-width ∝ 1/√prompts, from its own measured CI); for that
comparison measured rather than projected, run benchmarks/bench_taf.py.

    python benchmarks/bench_capture.py --lengths 512 2048 --num 8
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(method: str, length: int, num: int, device: str, model_spec: str) -> dict:
    import numpy as np
    import torch

    from profiler import capture as cap
    from profiler.load import load_model
    from profiler.probes import build_probes
    from profiler.profiles import FitSetup, build_profile

    cap.register()
    impl = {"hooks": "eager"}.get(method, cap.ATTN_NAME if method != "plain" else "sdpa")
    cuda = device.startswith("cuda")
    if model_spec.endswith(".json"):
        # random weights at a real model's shape: timing and memory need no trained weights,
        # and nothing has to be downloaded or carried to a GPU machine
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(model_spec)
        torch.manual_seed(0)
        with torch.device(device):              # initialised where it runs: seconds, not minutes, at 1B
            model = AutoModelForCausalLM.from_config(config, attn_implementation=impl,
                                                     dtype=torch.bfloat16 if cuda else torch.float32)
        model = model.eval()
        input_ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(num, length))
    else:
        loaded = load_model(model_spec, attn_implementation=impl, device=device, dtype="auto")
        model = loaded.model
        input_ids = build_probes("text:stdlib", loaded.tokenizer, length, num, seed=0).input_ids
    window = cap.default_window(length)
    # warm-up outside the timing, with the method's own recorder so that the tail reduction and the
    # Triton kernels (compiled on first use) are ready. On CUDA at the full length, so that the
    # caching allocator's first cudaMallocs and first-call library set-up at this shape are not
    # timed; on CPU T = 64 (a full-length forward there costs as much as a timed one).
    warm_length = length if cuda else 64
    warm = torch.as_tensor(input_ids[:1, :warm_length], device=model.device)
    estimators = {"tail": ["tail"], "dense": ["dense"], "paired": [None, "tail", "dense"]}.get(method, ["tail"])
    # the recorder options of each capture "paired" times on CUDA (see below)
    variants = {"": {}, "-layer": dict(batch_layers=False), "-sdpa": dict(fused_attention=False)}
    for estimator in estimators:
        for options in (variants.values() if method == "paired" and cuda and estimator else [{}]):
            recorder = cap.Recorder(estimator, cap.default_window(warm_length), **options)
            with cap.recording(recorder) if impl == cap.ATTN_NAME and estimator else contextlib.nullcontext(), \
                    torch.inference_mode():
                model(input_ids=warm, use_cache=False, logits_to_keep=1)
            recorder.finish()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    result: dict = {"method": method, "length": length, "num": num}
    t0 = time.perf_counter()
    if method == "plain":
        for row in input_ids:
            with torch.inference_mode():
                model(input_ids=torch.as_tensor(row[None], device=model.device), use_cache=False,
                      logits_to_keep=1)
    elif method in ("tail", "dense"):
        curves = cap.capture(model, input_ids, window=window, estimator=method)
    elif method == "hooks":
        rows = []
        for row in input_ids:
            with torch.inference_mode():
                att = model(input_ids=torch.as_tensor(row[None], device=model.device), use_cache=False,
                            logits_to_keep=1, output_attentions=True).attentions
                counts = cap._visible_tail(None, length, window, att[0].device).sum(dim=-1)
                rows.append(torch.stack([cap.reduce_tail(a[:, :, -window:].float(), counts).A[0].cpu()
                                         for a in att]))
            del att
    elif method == "taf":
        curves = cap.capture_taf(model, input_ids)
    elif method == "paired":
        # plain, tail and dense forwards interleaved probe by probe in one process, the order
        # rotating, so machine drift hits all alike: with no recorder active the attnprof
        # attention is exactly SDPA. Each ends with its results on the host (a synchronise).
        # On CUDA, where layers are reduced in batches (capture.LayerBatch), also "tail-layer" and
        # "dense-layer": each layer reduced on its own, one Triton launch given its fused
        # attention's logsumexp (the code of H200 runs 3-4); and "dense-sdpa": dense batches
        # whose layers keep SDPA attention (no cuDNN logsumexp call per layer; pass 1 runs in
        # the batch launch instead), to choose between the two on the device.
        kinds = ["plain", "tail", "dense"] + (["tail-layer", "dense-layer", "dense-sdpa"] if cuda else [])
        spent = dict.fromkeys(kinds, 0.0)
        for n, row in enumerate(input_ids):
            ids = torch.as_tensor(row[None], device=model.device)
            for kind in kinds[n % len(kinds):] + kinds[: n % len(kinds)]:
                t = time.perf_counter()
                if kind == "plain":
                    with torch.inference_mode():
                        model(input_ids=ids, use_cache=False, logits_to_keep=1)
                    if cuda:
                        torch.cuda.synchronize()
                else:
                    estimator, _, variant = kind.partition("-")
                    rec = cap.Recorder(estimator, window, **variants["-" + variant if variant else ""])
                    with cap.recording(rec), torch.inference_mode():
                        model(input_ids=ids, use_cache=False, logits_to_keep=1)
                    rec.finish()                    # statistics to the host, as capture() does
                spent[kind] += time.perf_counter() - t
        result.update({f"{k}_seconds": v for k, v in spent.items()},
                      ratios={k: v / spent["plain"] for k, v in spent.items() if k != "plain"})
    if cuda:
        torch.cuda.synchronize()
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss_mb"] = peak_rss_mb()
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if method in ("tail", "dense", "taf"):
        meta = {"rope_theta": None}
        if method == "taf":
            setup = FitSetup.points(cap.taf_fit_distances(curves.distances), num, 0)
        else:
            from profiler.rules import FIT_SINK_MARGIN
            setup = FitSetup.make(length - window - FIT_SINK_MARGIN, num, 0)
        prof = build_profile(curves, input_ids, meta, {"length": length}, setup)
        lo, hi = prof.model_level.gamma_ci
        result.update(gamma=prof.model_level.gamma, ci_half_width=(hi - lo) / 2)
    return result


def run_child(method: str, length: int, num: int, device: str, budget_gb: float, model_spec: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, __file__, "--child", method, "--length", str(length), "--num", str(num),
           "--device", device, "--model", model_spec]

    def limit():
        if device == "cpu":
            size = int(budget_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (size, size))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=limit)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        oom = any(k in proc.stderr for k in ("MemoryError", "can't allocate", "out of memory", "DefaultCPUAllocator"))
        return {"method": method, "length": length, "num": num,
                "error": ("CUDA out of memory" if device.startswith("cuda") else
                          f"out of memory (budget {budget_gb:g} GiB)") if oom or proc.returncode in (-9, 137)
                else tail[:120]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--num", type=int, default=8, help="probes at the first length (fewer at longer ones)")
    ap.add_argument("--methods", default="plain,tail,dense,hooks,taf,paired")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m",
                    help="a model attnprof can load, or a config .json for random weights at that shape "
                         "(benchmarks/configs/)")
    ap.add_argument("--budget-gb", type=float, default=16.0, help="address-space budget per child (CPU)")
    ap.add_argument("--json", default=None, help="also write all results to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.length, args.num, args.device, args.model)), flush=True)
        return
    methods = args.methods.split(",")
    results = []
    print(f"model {args.model}, device {args.device}, {os.cpu_count()} CPUs, budget {args.budget_gb:g} GiB "
          "per method", flush=True)
    for length in args.lengths:
        num = max(1, args.num * args.lengths[0] // length) if length > args.lengths[0] else args.num
        rows = {m: run_child(m, length, num, args.device, args.budget_gb, args.model) for m in methods}
        results.extend(rows.values())
        base = rows.get("plain", {}).get("seconds")
        print(f"\nT = {length}, {num} probe(s)")
        print(f"  {'method':7s} {'seconds':>9s} {'× plain':>8s} {'peak RSS MB':>12s}  gamma (CI half-width)")
        for m, r in rows.items():
            if "error" in r:
                print(f"  {m:7s} {r['error']}")
                continue
            ratio = f"{r['seconds'] / base:8.2f}" if base else "       -"
            extra = f"  {r['gamma']:.3f} (±{r['ci_half_width']:.3f})" if "gamma" in r else ""
            if m == "paired":
                extra = ("  interleaved: " + ", ".join(f"{k} {r[k + '_seconds']:.2f} s" for k in ["plain", *r["ratios"]])
                         + "; " + ", ".join(f"{k}/plain = {v:.2f}" for k, v in r["ratios"].items()))
            cuda = f"  cuda {r['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in r else ""
            print(f"  {m:7s} {r['seconds']:9.2f} {ratio} {r['peak_rss_mb']:12.0f}{extra}{cuda}")
        tail, taf = rows.get("tail", {}), rows.get("taf", {})
        if "ci_half_width" in tail and "ci_half_width" in taf and tail["ci_half_width"] > 0:
            need = taf["num"] * (taf["ci_half_width"] / tail["ci_half_width"]) ** 2
            projected = taf["seconds"] / taf["num"] * need
            print(f"  TAF to the tail CI half-width ±{tail['ci_half_width']:.3f}: ≈{need:.1f} prompts, "
                  f"≈{projected:.0f} s projected = {projected / tail['seconds']:.1f}× the tail capture")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
