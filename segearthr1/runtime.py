"""Where and how this process runs: rank and world size, rank-aware logging, device and dtype, and
the non-finite check every stage applies to model outputs.

Why one module: the rank decides what is logged, which samples a process evaluates and which device
it uses; with one `get_rank` (and one fallback) these can no longer disagree. Entry points launched by
`torchrun`/`deepspeed` join the process group through `init_distributed`; HF/DeepSpeed create it
themselves during training. Before a group exists, the launcher's environment (RANK, WORLD_SIZE) is
the truth; without a launcher everything degrades to one process. gloo is used on CPU, nccl on CUDA.
"""
from __future__ import annotations

import datetime
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import NonFiniteError

logger = logging.getLogger("segearthr1")

DEFAULT_TIMEOUT_MIN = 60


# ------------------------------------------------------------------------------------------------
# rank and world size

def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; it is set by torchrun "
                         "(unset it to run a single process)") from err


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank: the process group's if initialised, else the launcher's RANK (0 without one)."""
    return dist.get_rank() if is_initialized() else _env_int("RANK", 0)


def get_world_size() -> int:
    """Number of processes: the process group's if initialised, else the launcher's WORLD_SIZE (1 without one)."""
    return dist.get_world_size() if is_initialized() else _env_int("WORLD_SIZE", 1)


def is_main_process() -> bool:
    return get_rank() == 0


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: global rank, world size, local rank and the device it should use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # True if init_distributed created the process group (cleanup destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | torch.device | None = "auto",
                     timeout_min: int = DEFAULT_TIMEOUT_MIN) -> DistContext:
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); one process when WORLD_SIZE is unset or 1.

    Backend: nccl when the chosen device is CUDA, gloo otherwise. An already initialised group is
    reused as it is.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    chosen = resolve_device(device, local_rank=local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, chosen, False)
    if world_size <= 1:
        return DistContext(0, 1, 0, chosen, False)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed; run a "
                           "single process or install a torch with distributed support")
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min))
    logger.info("joined process group: rank %d of %d (backend %s, device %s)", dist.get_rank(),
                dist.get_world_size(), backend, chosen)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, chosen, True)


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects); [obj] in one process.

    A launched process (WORLD_SIZE > 1) without a process group cannot gather: it raises instead of
    returning its own part as if it were everything."""
    if not is_initialized():
        if get_world_size() > 1:
            raise RuntimeError(f"WORLD_SIZE={get_world_size()} but torch.distributed is not initialised, so "
                               "results of the other ranks cannot be gathered; call "
                               "segearthr1.runtime.init_distributed() first")
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# DeepSpeed's CPU all-reduce (its "shm comm" op) maps one POSIX shared-memory segment per rank, named
# deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}, and never unlinks it.
_DEEPSPEED_SHM_NAME = "deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def release_deepspeed_shm_name(shm_dir: str | os.PathLike = "/dev/shm") -> Path | None:
    """Unlink this rank's DeepSpeed all-reduce segment name; returns the path removed, if any.

    Why: every multi-process CPU run otherwise leaves ~67 MB per rank in RAM-backed /dev/shm after it
    exits (measured here: 114 segments, 7.4 GB of RAM, after a day of test and quickstart runs). Once
    every rank has mapped every peer's segment (DeepSpeed does that while the process group is set up)
    and a barrier has passed, the name is no longer needed: the mappings stay valid until the processes
    exit, and the memory is freed then, even when a run is killed.
    """
    if not is_initialized() or dist.get_world_size() < 2:
        return None
    dist.barrier()
    path = Path(shm_dir) / _DEEPSPEED_SHM_NAME.format(
        uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""), port=os.environ.get("MASTER_PORT", ""),
        rank=dist.get_rank())
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    logger.debug("unlinked %s (DeepSpeed shared-memory all-reduce buffer; mapped by every rank)", path)
    return path


def cleanup(ctx: DistContext | None) -> None:
    """Destroy the process group if `init_distributed` created it."""
    if ctx is not None and ctx.initialized_here and is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# device and dtype

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_device(requested: str | torch.device | None, local_rank: int | None = None) -> torch.device:
    """`auto`/None: CUDA if available, else CPU. Given `local_rank` (under a launcher), a bare `cuda`
    becomes cuda:<local_rank>. Asking for CUDA where there is none is an error, not a late crash."""
    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(requested)!r} was requested but CUDA is not available; use cpu or auto")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`/None: bf16 on CUDA, fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in (None, "auto"):
        resolved = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose auto, {', '.join(DTYPES)}")
    else:
        resolved = DTYPES[dtype]
    warn_if_slow_cpu_bf16(resolved, device)
    return resolved


def warn_if_slow_cpu_bf16(dtype: torch.dtype, device: torch.device | str) -> None:
    """One warning per process when bf16/fp16 will run on PyTorch's reference CPU kernels: a CPU without
    native ones and SEGEARTHR1_CPU_LOWP_PRODUCTS=native (by default their matrix products run in fp32
    instead, see perf/cpu_low_precision.py, which logs that once)."""
    from .perf import cpu_low_precision as lowp

    if (torch.device(device).type == "cpu" and dtype in lowp.LOW_PRECISION and lowp.setting() == "native"
            and not lowp.has_native_kernels(dtype)):
        name = str(dtype).replace("torch.", "")
        warning_once(f"{name} on this CPU with {lowp.ENV_VAR}=native: no native {name} matrix products (no AVX-512 "
                     f"bf16/FP16 or AMX), PyTorch's reference kernels are several times slower than fp32; unset "
                     f"{lowp.ENV_VAR} to run them in fp32")


# glibc mallopt parameters (malloc.h) and what CPU training sets them to
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
CPU_MALLOC_SETTINGS = {"mmap": "off", "trim": "off"}
_USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                    "GLIBC_TUNABLES")


def _glibc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tune_cpu_allocator() -> dict[str, str] | None:
    """From now on keep every freed block in the process heap; call it once the model is built or loaded.

    Why: glibc gives blocks above its mmap threshold (at most 32 MiB) fresh pages and returns them to the
    OS when freed, and trims the heap top after frees, so every CPU step faults its gradients and large
    activations in again, and on the VMs measured here a faulted GB costs ~1.5 s of kernel time: a
    full-size fp32 training step at 512² faulted 6.5 GB (1.6 M faults, 10 s of system time) in its
    backward. With no mmap and no trimming nothing faults after the first step (tiny model at 128 px:
    2,923 faults per step -> 0). Measured with `segearthr1 benchmark` (full size, fp32, 2 threads,
    batch 1): training fwd+bwd at 512² 21.8-24.1 -> 14.8 s, predict at 1024² 14.2-14.7 -> 12.8-13.1 s;
    the price is peak RSS, 14.6 -> 15.3 GB and 8.3 -> 8.5 GB, since freed blocks are reused where they fit rather
    than given back. Called after the build so the weights keep the exact blocks they were given, after
    `malloc_trim(0)` hands back the holes initialisation left (set before the build, weights and init
    temporaries interleave in the heap: +0.3-0.9 GB more). The process keeps its high-water mark until it
    exits. Numerics are unchanged. Skipped (returns None) off glibc, when the user set any MALLOC_* /
    GLIBC_TUNABLES variable, or with SEGEARTHR1_MALLOC_TUNING=0."""
    if os.environ.get("SEGEARTHR1_MALLOC_TUNING", "1") == "0" or any(k in os.environ for k in _USER_MALLOC_ENV):
        return None
    libc = _glibc()
    if libc is None:  # not glibc (musl, macOS): nothing to tune
        return None
    libc.malloc_trim(0)
    # M_MMAP_MAX 0: every block from the heap; M_TRIM_THRESHOLD -1: never shrink it (mallopt(3))
    ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)
    return dict(CPU_MALLOC_SETTINGS) if ok else None


def tune_cpu_allocator_for(device: torch.device | str, what: str) -> dict[str, str] | None:
    """`tune_cpu_allocator()` when `device` is the CPU, with a log line: what training, `benchmark`, `predict`
    and `evaluate` call once their model is loaded."""
    if torch.device(device).type != "cpu":
        return None
    settings = tune_cpu_allocator()
    if settings is not None:
        logging.getLogger(__name__).info(
            "%s on CPU: glibc malloc now keeps freed memory in the heap (no mmap, no trimming), so steps do not "
            "fault their memory in again (SEGEARTHR1_MALLOC_TUNING=0 leaves it alone)", what)
    return settings


# ------------------------------------------------------------------------------------------------
# logging (library modules use `logging.getLogger(__name__)`; these helpers avoid N-fold logs)

def log_main(msg: str, *args, level: int = logging.INFO, log: logging.Logger | None = None) -> None:
    """Log on rank 0 only."""
    if is_main_process():
        (log or logger).log(level, msg, *args)


@functools.lru_cache(maxsize=None)
def warning_once(msg: str) -> None:
    """Emit a warning once per process (deduplicated by message text)."""
    logger.warning(msg)


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = get_rank()
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger for command-line entry points (library code never calls this)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [rank%(rank)s] %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# ------------------------------------------------------------------------------------------------
# non-finite outputs: a diverged model produces NaN/Inf logits, and `logits > 0` turns those into empty
# masks that look like ordinary (bad) predictions; training, evaluation and inference check them here.

def count_nonfinite(tensor: torch.Tensor) -> int:
    """Number of NaN/Inf elements (0 for integer tensors)."""
    if not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor)).sum().item())


def check_finite_logits(logits: torch.Tensor, where: str, log: logging.Logger, strict: bool = False) -> int:
    """Warn (or raise NonFiniteError when `strict`) if `logits` hold NaN/Inf; returns the count.

    `where` names the sample(s) or stage, e.g. "evaluation batch 3 (img_001, img_002)".
    """
    bad = count_nonfinite(logits)
    if bad:
        facts = dict(what=f"the model produced {bad} non-finite mask logits of {logits.numel()} (NaN/Inf), so "
                          "its masks are meaningless", where=where,
                     hint="check the training log for non-finite losses")
        if strict:
            raise NonFiniteError(**facts)
        log.warning(NonFiniteError.compose(**facts))
    return bad
