"""Release DeepSpeed's shared-memory all-reduce names once training has started (see
`segearthr1.runtime.release_deepspeed_shm_name`): the segments are created when the DeepSpeed engine
is built inside `Trainer.train`, so the earliest safe point is `on_train_begin`, which runs after it."""
from __future__ import annotations

from transformers import TrainerCallback

from ..runtime import release_deepspeed_shm_name


class ReleaseDeepSpeedShmCallback(TrainerCallback):
    """Unlinks this rank's /dev/shm all-reduce buffer name at the start of training (a barrier first)."""

    def on_train_begin(self, args, state, control, **kwargs):
        release_deepspeed_shm_name()
        return control
