"""The learning-rate schedule: a pure function of the step, so a resume restores it exactly."""
from __future__ import annotations

import math

from ..config import TrainConfig
from ..errors import PipelineError


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate for the update with 0-based index `step`: warmup, then the chosen decay."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    floor = train.lr * train.min_lr_ratio
    if train.schedule == "constant":
        return train.lr
    if train.schedule == "cosine":
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        return floor + (train.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if train.schedule == "wsd":  # warmup, stable, then linear decay over the last decay_fraction
        decay_start = train.max_steps - int(train.decay_fraction * train.max_steps)
        if step < decay_start:
            return train.lr
        return train.lr + (floor - train.lr) * (step - decay_start) / max(1, train.max_steps - decay_start)
    raise PipelineError(f"train.schedule={train.schedule!r}: choose cosine, constant or wsd")
