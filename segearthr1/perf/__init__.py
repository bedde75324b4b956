"""Performance instrumentation: per-stage timing/FLOPs (`StageTimer`), device peaks and memory."""
from .hardware import PeakMemory, peak_tflops
from .stages import STAGES, StageTimer

__all__ = ["STAGES", "PeakMemory", "StageTimer", "peak_tflops"]
