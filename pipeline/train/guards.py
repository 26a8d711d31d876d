"""The skip guard: updates withheld on every rank for a non-finite loss or gradient norm, or a loss spike.

Its decision rides on the step's one control all-reduce (`flags`), so every rank skips the same step; it
counts skips, stops the run when told to (train.nonfinite=stop, max_nonfinite_skips in a row) and keeps
the spike window, which the checkpoint carries so a resumed run decides as an uninterrupted one would.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from ..config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class GuardState:
    nonfinite_skips: int = 0  # updates skipped for a non-finite loss or gradient norm
    spike_skips: int = 0  # updates skipped by the loss-spike guard
    consecutive_skips: int = 0
    loss_history: list = field(default_factory=list)  # the last losses of applied updates


class SkipGuard:
    def __init__(self, train: TrainConfig, section: str):
        self.train, self.section = train, section
        self.state = GuardState()

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, record: dict) -> None:
        self.state = GuardState(**{k: record[k] for k in asdict(GuardState()) if k in record})

    def flags(self, engine, step_loss: torch.Tensor) -> dict[str, bool]:
        """This rank's contribution to the control all-reduce. Non-finite: the loss, or (ZeRO 0, whose
        gradients are all-reduced in full before the step, so every rank holds the same) the gradients;
        DeepSpeed's ZeRO optimizers check their partitioned gradients' norm themselves."""
        checks = [step_loss]
        # (fp16: scaled gradients overflow routinely; DeepSpeed's loss scaler skips those steps itself)
        if engine.zero_optimization_stage() == 0 and not engine.fp16_enabled():
            norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32)
                     for p in engine.module.parameters() if p.grad is not None]
            if norms:
                checks.append(torch.linalg.vector_norm(torch.stack(norms)))
        bad = (~torch.isfinite(torch.stack(checks))).tolist()  # the one host sync of the step
        return {"nonfinite_loss": bad[0], "nonfinite_grad": any(bad[1:])}

    def reason(self, agreed: dict[str, bool], step_loss: torch.Tensor) -> str | None:
        """Why this step's update must not be applied (the same on every rank), or None."""
        if agreed["nonfinite_loss"] or agreed["nonfinite_grad"]:
            return "non-finite loss" if agreed["nonfinite_loss"] else "non-finite gradient norm"
        threshold, history = self.train.spike_threshold, self.state.loss_history
        if not threshold:
            return None
        total = step_loss.detach().clone()
        dist.all_reduce(total)
        loss = total.item() / dist.get_world_size()
        if len(history) >= self.train.spike_window:
            mean = sum(history) / len(history)
            std = math.sqrt(sum((x - mean) ** 2 for x in history) / len(history))
            if loss > mean + threshold * std:
                return (f"loss spike ({loss:.4g} > {mean:.4g} + {threshold:g} × {std:.4g}, the mean and std of "
                        f"the last {len(history)} updates)")
        self.state.loss_history = (history + [loss])[-self.train.spike_window:]
        return None

    def applied(self) -> None:
        self.state.consecutive_skips = 0

    def skipped(self, reason: str, step: int, stage: str) -> tuple[dict, str | None]:
        """Count an update every rank skipped: (its metrics record, why the run must stop or None)."""
        state, train, key = self.state, self.train, self.section
        spike = reason.startswith("loss spike")
        state.consecutive_skips += 1
        if spike:
            state.spike_skips += 1
        else:
            state.nonfinite_skips += 1
        if dist.get_rank() == 0:
            log.warning("%s: step %d: %s; the update is skipped on every rank", stage, step, reason)
        record = {"step": step, "skipped_update": reason, "nonfinite_skips": state.nonfinite_skips,
                  "spike_skips": state.spike_skips, "consecutive_skips": state.consecutive_skips}
        if state.consecutive_skips > train.max_nonfinite_skips:
            return record, (f"{state.consecutive_skips} updates in a row skipped, the last at step {step} for a "
                            f"{reason} ({key}.max_nonfinite_skips={train.max_nonfinite_skips})")
        if not spike and train.nonfinite == "stop":
            return record, f"{reason} at step {step} ({key}.nonfinite=stop)"
        return record, None
