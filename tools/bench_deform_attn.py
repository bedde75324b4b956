"""Time the deformable-attention cores on one full-size pixel-decoder layer (8 heads x 32 channels, 3 levels
at strides 8/16/32, 4 points; every position is a query), forward and forward+backward, on CPU or CUDA.

    python3 tools/bench_deform_attn.py --image_size 1024 --device cpu --threads 2
    python3 tools/bench_deform_attn.py --image_size 1024 --device cuda --batch_size 8 --output cores.json

Prints the fastest of --repeats runs per core, and the largest difference of each core's output and input
gradients from the grid_sample core (float32 rounding is expected; locations at exact pixel centres may
differ in their one-sided gradient).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segearthr1.modeling import ms_deform_attn as mda  # noqa: E402


def _cores(device: torch.device) -> dict:
    cores = {"pytorch": mda.ms_deform_attn_core_pytorch, "gather": mda.ms_deform_attn_core_gather}
    if device.type == "cuda" and mda._compiled_op() is not None:
        def compiled(value, shapes, locations, weights):
            shapes_t = torch.tensor(shapes, dtype=torch.long, device=value.device)
            start = torch.cat((shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]))
            return mda._CompiledMSDeformAttnFunction.apply(value, shapes_t, start, locations, weights)
        cores["cuda"] = compiled
    return cores


def _inputs(args, device):
    s = args.image_size
    shapes = [(s // 8, s // 8), (s // 16, s // 16), (s // 32, s // 32)]
    total = sum(h * w for h, w in shapes)
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(args.batch_size, total, 8, 32, generator=gen)
    locations = torch.rand(args.batch_size, total, 8, 3, 4, 2, generator=gen) * 1.1 - 0.05
    weights = torch.rand(args.batch_size, total, 8, 3, 4, generator=gen).softmax(-1)
    return shapes, [t.to(device) for t in (value, locations, weights)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(core, shapes, tensors, backward: bool, device):
    leaves = [t.detach().clone().requires_grad_(backward) for t in tensors]
    _sync(device)
    start = time.perf_counter()
    out = core(leaves[0], shapes, leaves[1], leaves[2])
    if backward:
        out.backward(torch.ones_like(out))
    _sync(device)
    return time.perf_counter() - start, out.detach(), [t.grad for t in leaves] if backward else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image_size", type=int, default=1024, help="model input size (levels are size/8, /16, /32)")
    p.add_argument("--batch_size", type=int, default=1, help="images per call")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per core and mode (fastest is reported)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes, tensors = _inputs(args, device)
    results, reference = {}, {}
    for name, core in _cores(device).items():
        row = {}
        for mode, backward in (("forward_s", False), ("forward_backward_s", True)):
            _run(core, shapes, tensors, backward, device)  # warm-up
            times = []
            for _ in range(args.repeats):
                seconds, out, grads = _run(core, shapes, tensors, backward, device)
                times.append(seconds)
            row[mode] = min(times)
            if backward:
                if name == "pytorch":
                    reference = {"output": out, "grads": grads}
                else:
                    row["max_abs_diff_output"] = (out - reference["output"]).abs().max().item()
                    row["max_abs_diff_grads"] = [(g - r).abs().max().item() for g, r in zip(grads, reference["grads"])]
        results[name] = row
        sys.stdout.write(f"{name:8s} forward {row['forward_s']:.3f} s   forward+backward {row['forward_backward_s']:.3f} s"
                         + (f"   max |diff| out {row['max_abs_diff_output']:.1e}" if "max_abs_diff_output" in row else "")
                         + "\n")
    summary = {"image_size": args.image_size, "batch_size": args.batch_size, "device": str(device),
               "threads": torch.get_num_threads(), "cores": results}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
