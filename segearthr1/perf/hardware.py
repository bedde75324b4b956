"""Device facts a benchmark needs: dense peak TFLOP/s of known GPUs, and peak memory of a step."""
from __future__ import annotations

import resource
from pathlib import Path

import torch

# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets. fp32 = plain FP32 (PyTorch does not use
# TF32 for matmuls unless asked). Matched by substring of torch.cuda.get_device_name(), first match wins.
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
)


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    """Dense peak of `device` for `dtype` ("fp32"/"bf16"/"fp16"), or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAK_TFLOPS:
        if key in name:
            return peaks.get(dtype)
    return None


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory between `reset()` and `read()`: CUDA max allocated, or the process's peak RSS on CPU.

    On Linux the RSS high-water mark is reset through /proc/self/clear_refs, so the figure covers the
    measured steps rather than model construction; elsewhere it falls back to the lifetime peak.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.scope = "steps"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.scope = "process lifetime"

    def read(self) -> dict[str, float | str]:
        if self.device.type == "cuda":
            return {"kind": "cuda_max_allocated", "scope": self.scope,
                    "gb": torch.cuda.max_memory_allocated(self.device) / 1e9}
        hwm = _status_kib("VmHWM") if self.scope == "steps" else None
        if hwm is None:
            self.scope = "process lifetime"
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return {"kind": "cpu_peak_rss", "scope": self.scope, "gb": hwm * 1024 / 1e9}
