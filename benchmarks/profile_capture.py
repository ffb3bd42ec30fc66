"""Where a capture's time goes: forward passes under torch.profiler, plain beside tail and dense.

For each method it reports, per forward pass: wall-clock milliseconds (measured before the
profiler first runs),
the number of operators the host dispatches and kernels the device runs, the device's busy time
(sum of kernel times), and the operators with the most host time. A forward pass whose wall time
is near its host time and far above its device time is bound by launches, not by arithmetic:
there, the cost of a capture is the operators and kernels it adds per layer. On a GPU it also
lists the kernels with the most device time (which attention kernel SDPA picked, for one).

    python benchmarks/profile_capture.py --device cuda --model benchmarks/configs/smollm2-135m-32k.json \\
        --length 2048
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profiler import capture as cap  # noqa: E402


def forward(model: torch.nn.Module, ids: torch.Tensor, estimator: str | None) -> None:
    """One forward pass; with an estimator, a capture whose statistics end on the host."""
    if estimator is None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        if ids.is_cuda:
            torch.cuda.synchronize()
        return
    with cap.recording(cap.Recorder(estimator, cap.default_window(ids.shape[1]))) as rec, torch.inference_mode():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    rec.finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="benchmarks/configs/smollm2-135m-32k.json", help="a config .json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5, help="forward passes timed (and profiled) per method")
    ap.add_argument("--rows", type=int, default=12, help="operators listed per method")
    args = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    cap.register()
    config = AutoConfig.from_pretrained(args.model)
    cuda = args.device.startswith("cuda")
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=cap.ATTN_NAME,
                                                 dtype=torch.bfloat16 if cuda else torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.length), device=args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    print(f"{args.model}, T = {args.length}, {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, per forward pass:")
    methods = (("plain", None), ("tail", "tail"), ("dense", "dense"))
    walls = {}
    for name, estimator in methods:       # wall clocks first: once the profiler has run, CUPTI
        for _ in range(2):                # stays attached and slows every later launch
            forward(model, ids, estimator)
        start = time.perf_counter()
        for _ in range(args.repeat):
            forward(model, ids, estimator)
        walls[name] = (time.perf_counter() - start) / args.repeat * 1e3
    for name, estimator in methods:
        wall = walls[name]
        with profile(activities=activities) as prof:
            for _ in range(args.repeat):
                forward(model, ids, estimator)
        events = prof.key_averages()
        host_ops = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CPU
                       and e.key.startswith("aten::"))
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        launched = sum(e.count for e in kernels) / args.repeat
        device_ms = sum(e.self_device_time_total for e in (kernels or events)) / 1e3 / args.repeat
        print(f"\n{name}: wall {wall:.2f} ms, {host_ops / args.repeat:.0f} aten operators, "
              f"{launched:.0f} device kernels, device busy {device_ms:.2f} ms")
        top = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                     key=lambda e: e.self_cpu_time_total, reverse=True)[: args.rows]
        for e in top:
            print(f"  {e.key[:60]:60s} calls {e.count / args.repeat:7.1f}  "
                  f"self host {e.self_cpu_time_total / 1e3 / args.repeat:7.2f} ms")
        for e in sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[: args.rows // 2]:
            print(f"  device: {e.key[:72]:72s} {e.self_device_time_total / 1e3 / args.repeat:7.2f} ms")


if __name__ == "__main__":
    main()
