"""`segearthr1 benchmark`: what a training or inference step of a config's model costs, and where it goes.

Builds the model of any run config with random weights (no checkpoint or pretrained files needed), feeds it
a batch with the real prompt encoding, and measures step time (median/min), samples/s, a per-stage split
(forward and backward, see `segearthr1.perf.stages`), FLOPs per sample (torch.utils.flop_counter), achieved
TFLOP/s and MFU against the device's dense peak, peak memory and parameter counts.

    segearthr1 benchmark --config configs/earthreason.yaml --mode predict --dtype bf16 --batch_size 8
    segearthr1 benchmark --config configs/tiny.yaml --mode train --steps 20 --output tiny_train.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from .runtime import resolve_dtype, setup_logging, tune_cpu_allocator_for
from .perf import STAGES, PeakMemory, StageTimer, peak_tflops
from .perf.cpu_low_precision import cpu_products_in_fp32, needs_fp32_products

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Used when the run config names no tokenizer that exists locally (full-size configs without pretrained/):
# the token ids fit any vocabulary, only the prompt's length differs from Phi-1.5's tokenizer.
FALLBACK_TOKENIZER = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "reference" / "tokenizer_tiny_trained"
QUESTIONS = ("Which area of the image could serve as a safe gathering place after an earthquake?",
             "the large white building next to the parking lot in the upper left")
ANSWER = "The open square south of the stadium is far from tall buildings."


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (configs/*.yaml); its model section is built")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of the run config, repeatable (e.g. model.mask_decoder.num_layers=6)")
    p.add_argument("--mode", choices=("train", "predict"), default="predict",
                   help="train: forward + backward (+ optimizer); predict: model.predict under no_grad")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of the whole model and inputs")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--batch_size", type=int, default=1, help="samples per step")
    p.add_argument("--image_size", type=int, default=None, help="model input size S (default: the config's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, kernels, compile)")
    p.add_argument("--optimizer", choices=("none", "adamw"), default="none",
                   help="train mode: also time a fused AdamW step + zero_grad, as the trainer does (its state "
                        "costs 2x the trainable parameters in memory)")
    p.add_argument("--gradient_checkpointing", choices=("config", "on", "off"), default="config",
                   help="train mode: LLM gradient checkpointing as the config's train section says, or forced")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder, connector and decoders (model.compile)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="dense peak of the device for --dtype, for MFU (default: known GPUs by name; none on CPU)")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP-counting step")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    return p


# ------------------------------------------------------------------------------------------------
# model and batch
def _tokenizer_for(init) -> tuple[object, bool]:
    """(tokenizer, is_the_run's_own). The run's own tokenizer also resizes the embeddings as training does."""
    from .weights.files import load_tokenizer

    for candidate in (init.tokenizer_path, init.llm_path):
        if candidate and Path(candidate).is_dir():
            return load_tokenizer(Path(candidate)), True
    if not FALLBACK_TOKENIZER.is_dir():
        raise FileNotFoundError(f"benchmark: the config names no local tokenizer (init.tokenizer_path / init.llm_path) "
                                f"and the fallback {FALLBACK_TOKENIZER} is missing; set --set init.tokenizer_path=DIR")
    logger.info("no local tokenizer in the config: using %s for the prompt (ids fit any vocabulary)", FALLBACK_TOKENIZER)
    return load_tokenizer(FALLBACK_TOKENIZER), False


def build_model(args, device: torch.device | str = "cpu"):
    """Random-weight model of the run config + tokenizer + the config dict, initialised on `device`
    (a full-size model initialises in seconds on a GPU, a minute on CPU)."""
    from .configuration import SegEarthR1Config
    from .modeling.segearthr1 import SegEarthR1ForReasoningSegmentation
    from .weights.embeddings import setup_tokenizer_and_embeddings
    from .processing import seg_token_id
    from .training.args import build_model_kwargs, init_args, resolve_run_config

    config, _ = resolve_run_config(args.config, args.overrides)
    kwargs = build_model_kwargs(config["model"])
    if args.image_size:
        kwargs["image_size"] = args.image_size
    kwargs["compile"] = bool(args.compile or kwargs.get("compile", False))
    tokenizer, own = _tokenizer_for(init_args(config))
    if not own:
        kwargs.update(seg_token_id=seg_token_id(tokenizer), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = SegEarthR1ForReasoningSegmentation(SegEarthR1Config(**kwargs))
    if own:
        setup_tokenizer_and_embeddings(model, tokenizer)
    return model, tokenizer, config


def build_batch(tokenizer, dataset: str, batch_size: int, image_size: int, train: bool, seed: int) -> dict:
    from .data.collate import DataCollator
    from .data.registry import encode_sample_text

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(batch_size):
        sample = encode_sample_text(tokenizer, dataset, QUESTIONS[i % len(QUESTIONS)], ANSWER, train=train)
        sample["images"] = torch.randn(3, image_size, image_size, generator=gen)
        mask = torch.zeros(1, image_size, image_size, dtype=torch.uint8)
        mask[:, image_size // 4: image_size // 2, image_size // 3: 3 * image_size // 4] = 1
        sample["masks"] = mask
        samples.append(sample)
    return DataCollator(tokenizer.pad_token_id)(samples)


def _to(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device)
        elif isinstance(value, list) and value and torch.is_tensor(value[0]):
            value = [v.to(device) for v in value]
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------
# one step
class Step:
    """A callable step of the chosen mode, instrumented by `timer`."""

    def __init__(self, model, batch: dict, mode: str, optimizer):
        self.model, self.batch, self.mode, self.optimizer = model, batch, mode, optimizer

    def __call__(self, timer: StageTimer) -> None:
        model, batch = self.model, self.batch
        if self.mode == "predict":
            timer.begin("forward")
            with torch.no_grad():
                model.predict(**batch)
            timer.end("forward")
            return
        timer.begin("forward")
        out = model(**batch)
        timer.end("forward")
        timer.begin("backward")
        out.loss.backward()
        timer.end("backward")
        timer.begin("optimizer")
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        timer.end("optimizer")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kernel_usage() -> tuple[int, float]:
    """(minor page faults, system CPU seconds) of this process so far; (0, 0.0) where getrusage is missing."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0, 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def measure(step: Step, device: torch.device, steps: int,
            warmup: int) -> tuple[list[float], list[dict], dict[str, float]]:
    """Wall time of each timed step, its per-stage split, and the kernel's share: page faults and system
    CPU time per timed step (on CPU, memory the allocator hands back and takes again shows up there)."""
    from tqdm import tqdm

    model = step.model
    totals, splits = [], []
    faults, system_s = 0, 0.0
    for i in tqdm(range(warmup + steps), desc=f"benchmark {step.mode}", unit="step", file=sys.stderr):
        timer = StageTimer(device)
        model.stage_observer = timer
        _sync(device)
        before = _kernel_usage()
        start = time.perf_counter()
        step(timer)
        _sync(device)
        elapsed = time.perf_counter() - start
        after = _kernel_usage()
        model.stage_observer = None
        if i >= warmup:
            totals.append(elapsed)
            splits.append(timer.step_summary())
            faults += after[0] - before[0]
            system_s += after[1] - before[1]
    return totals, splits, {"page_faults_per_step": faults / steps, "system_cpu_s_per_step": system_s / steps}


def count_flops(step: Step, device: torch.device) -> dict[str, dict[str, float]]:
    """FLOPs of one step per phase and stage (FlopCounterMode: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    timer = StageTimer(device, flop_counter=counter)
    step.model.stage_observer = timer
    try:
        with counter:
            step(timer)
    finally:
        step.model.stage_observer = None
    summary = timer.step_summary()
    summary["_total"] = {"all": float(counter.get_total_flops())}
    return summary


# ------------------------------------------------------------------------------------------------
def _split_of_median_step(totals: list[float], splits: list[dict]) -> dict[str, dict[str, float]]:
    """The per-stage split of the step whose time is the median, plus "other" = that step's time not
    inside any phase (loop and instrumentation overhead), so the parts add up to the step."""
    order = sorted(range(len(totals)), key=totals.__getitem__)
    index = order[(len(order) - 1) // 2]
    split = {phase: dict(parts) for phase, parts in splits[index].items()}
    inside = sum(v for parts in split.values() for v in parts.values())
    split["other"] = {"other": max(totals[index] - inside, 0.0)}
    return split, totals[index]


def _param_counts(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable, "total": total}


def run(args) -> dict:
    from .runtime import resolve_device
    from .training.args import data_args
    from .data.registry import DATASETS

    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"benchmark: --device {args.device} but CUDA is not available on this machine; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, device)  # warns once where bf16 would run on reference CPU kernels
    t0 = time.perf_counter()
    model, tokenizer, config = build_model(args, device)
    model.to(device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    malloc = tune_cpu_allocator_for(device, "benchmark")  # as CPU training does, after the build
    dataset = data_args(config).dataset or "EarthReason"
    if dataset not in DATASETS:
        raise SystemExit(f"benchmark: data.dataset={dataset!r} is not one of {list(DATASETS)}")
    batch = _to(build_batch(tokenizer, dataset, args.batch_size, model.config.image_size, args.mode == "train",
                            args.seed), device, dtype)
    gradient_checkpointing = False
    optimizer = None
    if args.mode == "train":
        model.train()
        gradient_checkpointing = (bool(config["train"].get("gradient_checkpointing")) if args.gradient_checkpointing == "config"
                                  else args.gradient_checkpointing == "on")
        if gradient_checkpointing:
            # newer transformers renamed it (the old name warns that it goes in v6)
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.optimizer == "adamw":
            # fused, as the trainer's default (TrainingArguments.optim = adamw_torch_fused): one kernel over
            # all parameters instead of a Python loop of ~10 ops per tensor
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                          weight_decay=0.0, fused=True)
    else:
        model.eval()
    step = Step(model, batch, args.mode, optimizer)
    memory = PeakMemory(device)
    logger.info("built %s in %.1f s: %s parameters, image %d², batch %d, sequence %d tokens, %s on %s",
                args.config, build_s, f"{_param_counts(model)['total']:,}", model.config.image_size, args.batch_size,
                batch["input_ids"].shape[1], args.dtype, device)
    memory.reset()
    # bf16/fp16 on a CPU without native kernels: matrix products in fp32, as training and inference run them
    fp32_products = not model.config.compile and needs_fp32_products(dtype, device)
    with cpu_products_in_fp32(dtype, device) if fp32_products else contextlib.nullcontext():
        totals, splits, kernel = measure(step, device, args.steps, args.warmup)
        mem = memory.read()
        flops = None if args.no_flops else count_flops(step, device)
    median = statistics.median(totals)
    split, split_step = _split_of_median_step(totals, splits)
    result = {
        "config": str(args.config), "overrides": args.overrides, "mode": args.mode, "dtype": args.dtype,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": args.batch_size,
        "image_size": model.config.image_size, "sequence_length": int(batch["input_ids"].shape[1]),
        "dataset": dataset, "gradient_checkpointing": gradient_checkpointing, "optimizer": args.optimizer,
        "compile": bool(model.config.compile), "build_s": build_s, "steps": args.steps, "warmup": args.warmup,
        "step_s": {"median": median, "min": min(totals), "all": totals},
        "samples_per_s": args.batch_size / median,
        "stages_s": split, "stages_step_s": split_step, "memory": mem, "parameters": _param_counts(model),
        "kernel": kernel, "cpu_malloc": malloc, "cpu_products_in_fp32": fp32_products,
    }
    if flops is not None:
        total = flops.pop("_total")["all"]
        peak = args.peak_tflops if args.peak_tflops is not None else peak_tflops(device, args.dtype)
        achieved = total / median / 1e12
        result.update({"flops_per_step": total, "flops_per_sample": total / args.batch_size, "stages_flops": flops,
                       "achieved_tflops": achieved, "peak_tflops": peak,
                       "mfu": None if not peak else achieved / peak})
    return result


def format_table(result: dict) -> str:
    """The per-stage table: seconds (median over steps) and GFLOPs per step, forward and backward."""
    stages_s, stages_f = result["stages_s"], result.get("stages_flops", {})
    rows = [*STAGES, "optimizer", "other"] if result["mode"] == "train" else [*STAGES, "other"]
    label = {"loss": "loss" if result["mode"] == "train" else "postprocess"}
    lines = [f"{'stage':<22}{'fwd s':>9}{'bwd s':>9}{'total s':>9}{'share':>7}{'fwd GFLOP':>12}{'bwd GFLOP':>12}"]
    summed = 0.0
    for name in rows:
        fwd = stages_s.get("forward", {}).get(name, 0.0)
        bwd = sum(stages_s.get(phase, {}).get(name, 0.0) for phase in ("backward", "optimizer", "other"))
        ff = stages_f.get("forward", {}).get(name, 0.0) / 1e9
        bf = stages_f.get("backward", {}).get(name, 0.0) / 1e9
        summed += fwd + bwd
        lines.append(f"{label.get(name, name):<22}{fwd:>9.3f}{bwd:>9.3f}{fwd + bwd:>9.3f}{(fwd + bwd) / result['stages_step_s']:>7.1%}"
                     f"{ff:>12.1f}{bf:>12.1f}")
    step = result["step_s"]
    lines.append(f"{'sum = median step':<22}{'':>18}{summed:>9.3f}  (optimizer/other rows: time in the 'bwd' column)")
    lines.append(f"step: median {step['median']:.3f} s, min {step['min']:.3f} s over {result['steps']} steps; "
                 f"{result['samples_per_s']:.3f} samples/s")
    if "flops_per_sample" in result:
        mfu = "n/a (no peak for this device; pass --peak_tflops)" if result["mfu"] is None else f"{result['mfu']:.1%}"
        lines.append(f"FLOPs/sample {result['flops_per_sample'] / 1e9:,.1f} GFLOP; achieved "
                     f"{result['achieved_tflops']:.4f} TFLOP/s; MFU {mfu}")
    p, m = result["parameters"], result["memory"]
    lines.append(f"parameters: {p['total']:,} ({p['trainable']:,} trainable, {p['frozen']:,} frozen); peak memory "
                 f"{m['gb']:.2f} GB ({m['kind']}, {m['scope']})")
    lines.append(f"{result['mode']} {result['dtype']} on {result['device']} ({result['device_name']}, "
                 f"{result['threads']} threads), batch {result['batch_size']}, {result['image_size']}², "
                 f"{result['sequence_length']} tokens, gradient checkpointing {result['gradient_checkpointing']}, "
                 f"compile {result['compile']}")
    kernel = result.get("kernel")
    if kernel and result["device"].startswith("cpu"):
        malloc = ("glibc malloc heap-only" if result.get("cpu_malloc")
                  else "glibc malloc left alone: SEGEARTHR1_MALLOC_TUNING=0, MALLOC_* settings of your own, or not glibc")
        lines.append(f"kernel: {kernel['page_faults_per_step']:,.0f} page faults and "
                     f"{kernel['system_cpu_s_per_step']:.3f} s of system CPU time per step; {malloc}")
    if result.get("cpu_products_in_fp32"):
        lines.append("matrix products, convolutions and the attention backward in fp32, rounded back (no native "
                     "low-precision kernels on this CPU, or SEGEARTHR1_CPU_LOWP_PRODUCTS=fp32)")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    setup_logging()
    args = build_parser(prog).parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 0:
        raise SystemExit("benchmark: --steps and --batch_size must be >= 1 and --warmup >= 0")
    result = run(args)
    sys.stdout.write(format_table(result) + "\n")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))
        logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
