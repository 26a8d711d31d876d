"""The training loop shared by pretrain and finetune, with its side concerns beside it as small parts.

`fit` reads in a screen: learning rate, micro batches, one control all-reduce, the update (or a skip),
then logging, evaluation and checkpoints at their intervals. The skip guard (guards.py), checkpointing
(checkpointing.py) and the throughput meter below keep their own state. The loop keeps the host out of
the step: losses stay on the device, read once per step for the non-finite check (one host sync, as
DeepSpeed's own overflow check costs) and otherwise only at log intervals.
"""
from __future__ import annotations

import logging
import math
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from ..checkpoint.store import refuse_another_optimizer
from ..cluster import control
from ..config import TrainConfig
from ..errors import PipelineError
from ..faults import Faults
from ..observe.metrics import MetricsLogger, peak_flops
from . import attention_mask
from .checkpointing import Checkpointer
from .engine import update_withheld
from .guards import SkipGuard
from .schedule import lr_at

log = logging.getLogger(__name__)

CHECKPOINT_FAILED = "checkpoint_failed"


@dataclass
class TrainerState:
    step: int = 0  # optimizer updates done
    tokens_seen: int = 0
    loader: dict | None = None
    model: dict | None = None  # the ModelConfig that built the weights (export rebuilds it from here)


class StepMeter:
    """The train record of each log window: mean loss of its applied updates, throughput, MFU, memory."""

    def __init__(self, engine, device: torch.device, tokens_per_step: int, flops_per_token: int):
        self.engine, self.device = engine, device
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak = peak_flops(device)
        self.start()

    def start(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.steps, self.applied, self.started = 0, 0, time.perf_counter()

    def add(self, step_loss: torch.Tensor | None) -> None:
        """One step; `step_loss` None for a skipped update (its loss may be NaN)."""
        self.steps += 1
        if step_loss is not None:
            self.loss_sum += step_loss
            self.applied += 1

    def record(self, step: int, lr: float, tokens_seen: int, guard: SkipGuard) -> dict:
        """The window's record (collective: the loss is averaged over the ranks); starts the next window."""
        elapsed = time.perf_counter() - self.started
        loss = self.loss_sum.clone() / self.applied if self.applied else torch.full((), math.nan, device=self.device)
        dist.all_reduce(loss)
        loss = loss.item() / dist.get_world_size()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        tokens_per_s = self.tokens_per_step * self.steps / elapsed
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": step, "loss": loss, "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(tokens_per_s * self.flops_per_token / (self.peak * dist.get_world_size()), 4)
            if self.peak else None,
            "step_time_s": round(elapsed / self.steps, 4),
            "tokens_seen": tokens_seen,
            "memory_gb": round(_memory_bytes(self.device) / 2**30, 3),
            "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
            "nonfinite_skips": guard.state.nonfinite_skips, "spike_skips": guard.state.spike_skips,
        }
        self.start()
        return record


class Trainer:
    """Runs the loop for one stage; every rank constructs one."""

    def __init__(self, *, stage: str, section: str, engine, loader, eval_batches: Iterable, train: TrainConfig,
                 checkpoint_root: Path, metrics: MetricsLogger, flops_per_token: int, device: torch.device,
                 model_config: dict, faults: Faults | None = None, optimizer: str = "adamw",
                 eval_weights: dict[str, float] | None = None):
        self.stage, self.section, self.engine, self.loader = stage, section, engine, loader
        self.optimizer = optimizer  # its state is in the checkpoint: a resume must use the same one
        self.eval_batches, self.train, self.metrics, self.device = eval_batches, train, metrics, device
        self.model_config, self.faults = model_config, faults
        # a dict of eval sets (one per source of a mixture): val_loss/<source>, and val_loss their weighted mean
        self.eval_weights = eval_weights or {}
        self.state = TrainerState(model=model_config)
        self.tokens_per_step = train.global_batch_size * train.seq_len
        self.guard = SkipGuard(train, section)
        self.checkpoints = Checkpointer(engine, checkpoint_root, train.resume, train.keep_last, metrics, stage,
                                        section)
        self.meter = StepMeter(engine, device, self.tokens_per_step, flops_per_token)
        self.mask_kind, why = attention_mask.choose_kind(device, model_config.get("dropout", 0.0))
        self._mask_why = f"{stage}: attention masks: {self.mask_kind} ({why})"  # logged once masks are used

    def resume(self) -> None:
        found = self.checkpoints.find()
        if found is None:
            return
        folder, record = found
        refuse_another_optimizer(folder, record, self.optimizer, self.section)
        skip = self.faults.skip_restore if self.faults else ""  # tests prove the RNG and loader restores matter
        saved = self.checkpoints.load(folder, record, self.model_config, restore_rng=skip != "rng")
        self.state = TrainerState(step=saved["step"], tokens_seen=saved["tokens_seen"], loader=saved.get("loader"),
                                  model=self.model_config)
        self.guard.load_state_dict(saved)
        if skip != "loader":
            self.loader.load_state_dict(self.state.loader)
        log.info("%s: resumed from %s at step %d", self.stage, folder, self.state.step)
        self.metrics.rewind(self.state.step)
        self.metrics.log({"step": self.state.step, "resumed_from": str(folder)}, echo=False)  # the report marks it

    def fit(self) -> TrainerState:
        train = self.train
        self.engine.train()
        self.meter.start()
        while self.state.step < train.max_steps:
            lr = lr_at(self.state.step, train)
            step_loss = self._accumulate(lr)
            agreed = control.agree({**self.guard.flags(self.engine, step_loss),  # the step's one collective
                                    control.PREEMPT: control.preempt_requested() is not None,
                                    CHECKPOINT_FAILED: self.checkpoints.write_failed()})
            if agreed[CHECKPOINT_FAILED]:  # a background save failed (a full disk): stop now, on every rank
                self.checkpoints.check_writer()
            skip = self._update(agreed, step_loss)
            self.state.step += 1
            self.state.tokens_seen += self.tokens_per_step
            self.meter.add(None if skip else step_loss)
            step, last = self.state.step, self.state.step == train.max_steps
            if step % train.log_interval == 0 or last:
                self.metrics.log({**self.meter.record(step, lr, self.state.tokens_seen, self.guard),
                                  **(self.loader.tokens_seen() if hasattr(self.loader, "tokens_seen") else {})})
                self.checkpoints.record_if_written()
            if step % train.eval_interval == 0 or last:
                self.metrics.log({"step": step, **self.evaluate_all(), "tokens_seen": self.state.tokens_seen})
            saved = self.save() if step % train.save_interval == 0 or last else None
            if agreed[control.PREEMPT] and not last:  # every rank stops at this step boundary
                self._stop_preempted(saved or self.save())
            control.use_step_timeout()  # the first step (warm-up, compilation) ran under launch.timeout_s
        control.use_long_timeout()  # what follows the loop (final evals, the next stage) may take long
        self.checkpoints.finish()
        return self.state

    def _accumulate(self, lr: float) -> torch.Tensor:
        """Forward and backward of this step's micro batches; the mean loss, on the device."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # Muon's groups: a multiple of the schedule (× 1 exact)
        micro_batches = self.loader.next_global_batch()
        poison = self.faults.loss_factor(self.state.step + 1, dist.get_rank()) if self.faults else None
        step_loss = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            loss = self._forward(batch)
            if poison is not None and index == 0:
                loss = loss * poison  # injected fault: a NaN (or spiking) loss, and its gradients
            self.engine.backward(loss)
            step_loss += loss.detach() / len(micro_batches)
            if index < len(micro_batches) - 1:
                self.engine.step()  # accumulation only: the last micro batch's step is the update
        return step_loss

    def _update(self, agreed: dict[str, bool], step_loss: torch.Tensor) -> str | None:
        """The optimizer step, withheld on every rank when the guard says so; why it was skipped, or None."""
        engine = self.engine
        skip = self.guard.reason(agreed, step_loss)
        discarded = engine.skipped_steps
        with update_withheld(engine) if skip else nullcontext():
            engine.step()
        if not skip and engine.skipped_steps > discarded and not engine.fp16_enabled():
            # DeepSpeed's ZeRO and bf16 optimizers drop an update whose (global) gradient norm is not
            # finite; in fp16 that is routine loss scaling, counted in skipped_steps
            skip = "non-finite gradient norm"
        if not skip:
            self.guard.applied()
            return None
        record, stop = self.guard.skipped(skip, self.state.step + 1, self.stage)
        self.metrics.log(record)
        if stop:
            self.checkpoints.finish()
            raise PipelineError(f"{self.stage}: {stop}; {self.checkpoints.last_good()}: lower {self.section}.lr or "
                                f"check the data, then rerun ({self.section}.resume=auto continues from it)")
        return skip

    def save(self) -> Path:
        self.state.loader = self.loader.state_dict()
        return self.checkpoints.save(self.state.step, {**asdict(self.state), **self.guard.state_dict(),
                                                       "optimizer": self.optimizer})

    def _stop_preempted(self, saved: Path) -> None:
        self.checkpoints.finish()
        self.metrics.finish()
        raise control.Preempted(f"{self.stage}: preempted at step {self.state.step}; checkpoint {saved}; "
                                f"rerun the same command to resume")

    def _forward(self, batch) -> torch.Tensor:
        """The loss of one micro batch (inputs, labels[, segments of packed documents or examples])."""
        inputs, labels, *segments = (t.to(self.device, non_blocking=True) for t in batch)
        mask = None
        if segments:  # one mask per micro batch, shared by every layer
            if self._mask_why:
                log.info(self._mask_why)
                self._mask_why = None
            mask = attention_mask.build(segments[0], self.mask_kind)
        _, loss = self.engine(inputs, labels, mask=mask)
        return loss

    def evaluate_all(self) -> dict:
        """{"val_loss": ...}; with one eval set per source also each `val_loss/<source>`, and val_loss is
        their mean weighted by the sources' training shares."""
        if not isinstance(self.eval_batches, dict):
            return {"val_loss": self.evaluate(self.eval_batches)}
        losses = {name: self.evaluate(batches) for name, batches in self.eval_batches.items()}
        weights = {n: self.eval_weights.get(n, 1.0) for n, loss in losses.items() if loss is not None}
        total = sum(weights.values())
        overall = sum(losses[n] * w for n, w in weights.items()) / total if total else None
        return {"val_loss": overall, **{f"val_loss/{n}": loss for n, loss in losses.items()}}

    @torch.no_grad()
    def evaluate(self, eval_batches: Iterable | None = None) -> float | None:
        self.engine.eval()
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        for batch in self.eval_batches if eval_batches is None else eval_batches:  # re-iterable: the same every time
            loss = self._forward(batch)
            total += torch.stack([loss.detach().double(), torch.ones((), device=self.device, dtype=torch.float64)])
        dist.all_reduce(total)
        self.engine.train()
        return (total[0] / total[1]).item() if total[1] > 0 else None


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS of this rank
