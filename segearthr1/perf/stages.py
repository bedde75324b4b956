"""Per-stage wall time and FLOPs of one model step, forward and backward.

The model calls its `stage_observer` with each stage's output (`SegEarthR1ForReasoningSegmentation._stage`).
`StageTimer` records a mark there in the forward pass, and wraps the output tensors in an identity autograd
function whose backward records a mark when the gradient reaches that stage. A stage's time is the interval
from the previous mark to its own (forward) or from its mark to the next one (backward: the autograd engine
runs a stage's backward right after the gradient of its output is complete), so the parts add up to the
measured total by construction; FLOPs are attributed with the same marks from a running FlopCounterMode total.
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

import torch

# Model stages in forward order; "loss" is everything after the mask decoder (mask criterion, LLM head +
# cross-entropy). A benchmark adds "optimizer" (AdamW step + zero_grad).
STAGES = ("vision_encoder", "connector", "llm", "description_projector", "pixel_decoder", "mask_decoder", "loss")


class _Boundary(torch.autograd.Function):
    """Identity on a stage's output tensors; its backward marks "gradient reached this stage"."""

    @staticmethod
    def forward(ctx, timer, name, *tensors):
        ctx.timer, ctx.name = timer, name
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.timer.mark("backward", ctx.name)
        return (None, None, *grads)


def _tensors(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if dataclasses.is_dataclass(value):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name))]
    return []


def _replace(value, mapping: dict[int, torch.Tensor]):
    """`value` with every tensor whose id is in `mapping` swapped for its wrapped version."""
    if torch.is_tensor(value):
        return mapping.get(id(value), value)
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _replace(getattr(value, f.name), mapping)
                                             for f in dataclasses.fields(value)})
    if isinstance(value, dict):
        return type(value)((k, _replace(v, mapping)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_replace(v, mapping) for v in value)
    return value


class StageTimer:
    """Observer for `model.stage_observer`. Use per step::

        timer.begin("forward"); out = model(**batch); timer.end("forward")
        timer.begin("backward"); out.loss.backward(); timer.end("backward")
        timer.begin("optimizer"); opt.step(); opt.zero_grad(); timer.end("optimizer")
        timer.step_summary()   # {"forward": {stage: s}, "backward": {...}, "optimizer": {...}}

    `flop_counter` (a torch.utils.flop_counter.FlopCounterMode that is active during the step) makes the
    summary hold FLOPs instead of seconds.
    """

    def __init__(self, device: torch.device | str = "cpu", flop_counter=None):
        self.device = torch.device(device)
        self.flop_counter = flop_counter
        self._events: list[tuple[str, str, float]] = []  # (phase, label, clock)
        self._phase = None

    def _clock(self) -> float:
        if self.flop_counter is not None:
            return float(self.flop_counter.get_total_flops())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self, phase: str, label: str) -> None:
        self._events.append((phase, label, self._clock()))

    def begin(self, phase: str) -> None:
        self._phase = phase
        self.mark(phase, "<begin>")

    def end(self, phase: str) -> None:
        self.mark(phase, "<end>")
        self._phase = None

    def __call__(self, name: str, value):
        self.mark("forward", name)
        if not torch.is_grad_enabled():
            return value
        needing = [t for t in _tensors(value) if t.requires_grad]
        if not needing:
            return value
        wrapped = _Boundary.apply(self, name, *needing)
        return _replace(value, {id(t): w for t, w in zip(needing, wrapped)})

    def step_summary(self) -> dict[str, dict[str, float]]:
        """Per phase, the amount (seconds or FLOPs) attributed to each stage; resets the events."""
        out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        by_phase: dict[str, list[tuple[str, float]]] = defaultdict(list)
        for phase, label, clock in self._events:
            by_phase[phase].append((label, clock))
        for phase, events in by_phase.items():
            for (label, clock), (next_label, next_clock) in zip(events, events[1:]):
                if phase == "forward":
                    # interval up to a stage's mark belongs to that stage; after the last one: the loss
                    owner = "loss" if next_label == "<end>" else next_label
                elif phase == "backward":
                    # interval after a stage's mark belongs to that stage; before the first one: the loss
                    owner = "loss" if label == "<begin>" else label
                else:
                    owner = phase
                out[phase][owner] += next_clock - clock
        self._events.clear()
        return {phase: dict(parts) for phase, parts in out.items()}
