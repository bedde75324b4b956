"""Rank-aware logging: library modules use `logging.getLogger(__name__)`; these helpers avoid N-fold logs."""
from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger("segearthr1")


def get_rank() -> int:
    """Global rank from torch.distributed if initialised, else from the launcher's environment."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # torch is a hard dependency; this only guards odd interpreter shutdowns
        pass
    return int(os.environ.get("RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def log_main(msg: str, *args, level: int = logging.INFO, log: logging.Logger | None = None) -> None:
    """Log on rank 0 only."""
    if is_main_process():
        (log or logger).log(level, msg, *args)


@functools.lru_cache(maxsize=None)
def warning_once(msg: str) -> None:
    """Emit a warning once per process (deduplicated by message text)."""
    logger.warning(msg)


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger for command-line entry points (library code never calls this)."""
    fmt = "%(asctime)s %(levelname)s [rank%(rank)s] %(name)s: %(message)s"

    class _RankFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.rank = get_rank()
            return True

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
