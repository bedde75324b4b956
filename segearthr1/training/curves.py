"""training_curves.png: every logged loss part and the learning rate against the step.

Why: a run directory should show at a glance whether training went well (a loss part that stalls, a
learning-rate schedule that is not what the config meant) without starting TensorBoard. The plot is
redrawn from the Trainer's own `state.log_history` on every checkpoint save and at the end, so it is
complete after a resume too.
"""
from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

CURVES_FILE = "training_curves.png"


def logged_series(log_history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{key: (steps, values)} for every loss key (``loss``, ``loss_*``) and ``learning_rate`` in the logs."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            if (key == "loss" or key.startswith("loss_") or key == "learning_rate") and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(step))
                values.append(float(value))
    return series


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path | None:
    """Write the curves (one panel per loss part, one for the learning rate) to `path`; None if nothing was logged."""
    series = logged_series(log_history)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = sorted(k for k in series if k != "learning_rate") + (["learning_rate"] if "learning_rate" in series else [])
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = series[key]
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, color="tab:orange" if key == "learning_rate"
                else "tab:blue")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class TrainingCurvesCallback(TrainerCallback):
    """Redraw output_dir/training_curves.png on every save and at the end of training (main process only)."""

    def _draw(self, args, state) -> None:
        if not state.is_world_process_zero:
            return
        try:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            written = plot_training_curves(state.log_history, Path(args.output_dir) / CURVES_FILE)
        except (OSError, ValueError, RuntimeError) as err:  # a plot must never stop a training run
            logger.warning("could not draw %s: %s", CURVES_FILE, err)
            return
        if written is not None:
            logger.info("training curves: %s", written)

    def on_save(self, args, state, control, **kwargs):
        self._draw(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._draw(args, state)
