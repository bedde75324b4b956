"""runtime: one rank/world-size rule (process group, else the launcher's environment), device/dtype choice."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segearthr1 import runtime


def test_rank_and_world_size_fall_back_to_the_launcher_environment(monkeypatch):
    assert not runtime.is_initialized()
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (runtime.get_rank(), runtime.get_world_size(), runtime.is_main_process()) == (0, 1, True)
    assert runtime.all_gather_objects({"a": 1}) == [{"a": 1}]
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (runtime.get_rank(), runtime.get_world_size(), runtime.is_main_process()) == (3, 4, False)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=4 but torch.distributed is not initialised"):
        runtime.all_gather_objects(1)  # never return one rank's part as if it were all of them
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        runtime.get_rank()


def test_log_main_logs_on_rank_zero_only(monkeypatch, caplog):
    log = logging.getLogger("segearthr1.test_runtime")
    with caplog.at_level(logging.INFO):
        monkeypatch.setenv("RANK", "1")
        runtime.log_main("from rank one", log=log)
        monkeypatch.setenv("RANK", "0")
        runtime.log_main("from rank zero", log=log)
    assert "from rank zero" in caplog.text and "from rank one" not in caplog.text


def test_device_and_dtype_resolution():
    cpu = torch.device("cpu")
    assert runtime.resolve_device("cpu") == cpu and runtime.resolve_device(cpu, local_rank=1) == cpu
    assert runtime.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' was requested but CUDA is not available"):
            runtime.resolve_device("cuda")
    assert runtime.resolve_dtype(None, cpu) == torch.float32
    assert runtime.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert runtime.resolve_dtype("bf16", cpu) == torch.bfloat16 and runtime.resolve_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        runtime.resolve_dtype("int8", cpu)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("setting", ["auto", "native"])
def test_reference_cpu_kernels_for_low_precision_warn_once(monkeypatch, caplog, native, setting):
    """bf16/fp16 that would run on PyTorch's reference CPU kernels (no native ones, and the fp32 products
    switched off) get one warning per process and dtype; never fp32 or CUDA, never with the default."""
    from segearthr1.perf import cpu_low_precision as lowp

    assert isinstance(lowp.has_native_kernels(torch.bfloat16), bool)  # the real probe answers on this machine
    monkeypatch.setattr(lowp, "has_native_kernels", lambda dtype: native)
    monkeypatch.setenv(lowp.ENV_VAR, setting)
    runtime.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            runtime.resolve_dtype("bf16", torch.device("cpu"))
        runtime.resolve_dtype("fp16", torch.device("cpu"))
        runtime.resolve_dtype("fp32", torch.device("cpu"))
        runtime.warn_if_slow_cpu_bf16(torch.bfloat16, "cuda")
    warnings = [r.getMessage() for r in caplog.records if "reference kernels are several times slower" in r.getMessage()]
    assert len(warnings) == (2 if setting == "native" and not native else 0), warnings
    assert all(lowp.ENV_VAR in w for w in warnings)


def test_non_finite_logits_are_named(caplog):
    from segearthr1.errors import NonFiniteError

    logits = torch.tensor([0.0, float("nan"), float("inf")])
    log = logging.getLogger("segearthr1.test_runtime")
    with caplog.at_level(logging.WARNING):
        assert runtime.check_finite_logits(logits, "batch 3 (a, b)", log) == 2
    assert "batch 3 (a, b): the model produced 2 non-finite mask logits of 3" in caplog.text
    with pytest.raises(NonFiniteError, match="use an earlier checkpoint"):
        runtime.check_finite_logits(logits, "batch 3", log, strict=True)
    assert runtime.check_finite_logits(torch.zeros(3), "ok", log) == 0 and runtime.count_nonfinite(torch.arange(3)) == 0


_FAULTS_SCRIPT = r"""
import resource, sys, types, torch
from segearthr1 import benchmark, runtime
torch.set_num_threads(1)
# 128 px: at the tiny config's 96 px glibc's adaptive mmap threshold already keeps this step's blocks in the heap
args = types.SimpleNamespace(config="configs/tiny.yaml", overrides=[], image_size=128, compile=False, seed=0)
model, tokenizer, _ = benchmark.build_model(args)
if sys.argv[1] == "tuned":  # after the build, as training and the benchmark call it
    assert runtime.tune_cpu_allocator() == runtime.CPU_MALLOC_SETTINGS
batch = benchmark.build_batch(tokenizer, "EarthReason", 4, model.config.image_size, True, 0)
def step():
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
usage = resource.getrusage(resource.RUSAGE_SELF)
print((usage.ru_minflt - before) // 3, usage.ru_maxrss)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tuning is Linux-only")
def test_cpu_allocator_tuning_stops_page_faults_in_a_training_step():
    """A tiny-model training step (the quickstart's model at 128 px, batch 4) re-faults its activation memory
    every step under glibc's defaults; with the tuning it reuses the heap."""
    env = {k: v for k, v in os.environ.items() if k not in runtime._USER_MALLOC_ENV}
    faults, peak_rss = {}, {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], env=env, capture_output=True, text=True,
                             timeout=300, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
        faults[mode], peak_rss[mode] = (int(v) for v in out.strip().splitlines()[-1].split())
    if faults["default"] < 300:
        pytest.skip(f"this C library does not give freed activation memory back to the OS (faults {faults})")
    # measured per step: default 624-2,923, tuned 0 (27-128 with the earlier 32 MiB-threshold tuning)
    assert faults["tuned"] * 3 < faults["default"], faults
    # and it is not bought with memory: the weights keep their blocks, the heap is reused (KiB)
    assert peak_rss["tuned"] <= peak_rss["default"] * 1.05, peak_rss


def test_cpu_allocator_tuning_respects_the_user(monkeypatch):
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_"):
        monkeypatch.setenv(name, "0")
        assert runtime.tune_cpu_allocator() is None, name  # the user's own malloc settings win
        monkeypatch.delenv(name)
    monkeypatch.setenv("SEGEARTHR1_MALLOC_TUNING", "0")
    assert runtime.tune_cpu_allocator() is None
