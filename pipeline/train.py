"""The training engine shared by `pretrain` and `finetune`: DeepSpeed ZeRO, schedule, loop.

Parallelism is applied here, outside the model: the model is a plain nn.Module and
`deepspeed.initialize` wraps it with the ZeRO stage and precision from the config groups.
The loop keeps the host out of the step: losses stay on the device, read once per step for the
non-finite check (one host sync, as DeepSpeed's own overflow check costs) and otherwise only at log
intervals; the learning rate is a pure function of the step, so resuming restores it exactly.
"""
from __future__ import annotations

import logging
import math
import os
import resource
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from . import control
from .checkpoint import find_resumable, load_checkpoint, save_checkpoint, verify
from .checkpoint_writer import BackgroundWriter
from .config import DeepSpeedConfig, LaunchConfig, PrecisionConfig, TrainConfig
from .errors import PipelineError
from .metrics import MetricsLogger, peak_flops
from .redaction import redact

log = logging.getLogger(__name__)


def init_distributed(launch: LaunchConfig) -> torch.device:
    """Join the process group the launcher described (torchrun, deepspeed or srun variables)."""
    import deepspeed

    from .distributed import export_torch_env

    export_torch_env()
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=launch.timeout_s),
                                   auto_mpi_discovery=False)
    control.setup(launch.timeout_s, launch.step_timeout_s)
    return device


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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and embeddings (1-D tensors and embedding tables)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or id(param) in embeddings else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, train: TrainConfig, ds: DeepSpeedConfig, device: torch.device):
    groups = param_groups(model, train.weight_decay)
    kwargs = dict(lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps)
    if ds.offload_optimizer:  # the optimizer step runs on the CPU: DeepSpeed's vectorised CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if device.type == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        except Exception as exc:  # its CUDA op failed to build: torch's fused AdamW is as fast
            log.warning("DeepSpeed FusedAdam unavailable (%s); using torch AdamW(fused=True)", exc)
            return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, precision: PrecisionConfig,
                     micro_batch: int, grad_accum: int) -> dict:
    zero: dict = {"stage": ds.stage}
    if ds.stage > 0:
        zero.update(overlap_comm=ds.overlap_comm, contiguous_gradients=ds.contiguous_gradients,
                    reduce_bucket_size=ds.reduce_bucket_size)
        if ds.stage < 3:
            zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        if ds.stage != 3:
            raise PipelineError("deepspeed.offload_param needs ZeRO stage 3: use deepspeed=zero3_offload")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if precision.name == "bf16":
        config["bf16"] = {"enabled": True}
        if ds.stage > 0:  # bf16 sums of accumulated gradients lose precision (DeepSpeed's ZeRO 0 can't)
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    elif precision.name == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise PipelineError(f"precision=fp16 is not supported on {get_accelerator().device_name()} "
                                f"(DeepSpeed's CPU accelerator has no fp16): use precision=bf16 or fp32")
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": precision.initial_scale_power,
                          "loss_scale_window": precision.loss_scale_window, "hysteresis": precision.hysteresis,
                          "min_loss_scale": precision.min_loss_scale}
    elif precision.name != "fp32":
        raise PipelineError(f"precision={precision.name!r}: choose bf16, fp16 or fp32")
    return _deep_merge(config, ds.extra)


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def initialize_engine(model: torch.nn.Module, optimizer, config: dict, zero_stage: int):
    """deepspeed.initialize, minus a side effect: without ZeRO, its bf16/fp16 optimizer wrapper takes
    one AdamW step with zero gradients at construction, which shifts Adam's step count and applies
    weight decay once. Undo it so training matches a plain loop from the first step."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.config = redact(engine.config)  # DeepSpeed pickles this dict into every checkpoint (ds_config)
    wrapper = engine.optimizer
    if zero_stage == 0 and hasattr(wrapper, "refresh_fp32_params"):
        wrapper.optimizer.state.clear()
        wrapper.refresh_fp32_params()
    return engine


def build_engine(model_cfg, train: TrainConfig, ds: DeepSpeedConfig, precision: PrecisionConfig,
                 device: torch.device, grad_accum: int, load_weights=None) -> tuple[object, int]:
    """(DeepSpeed engine, parameter count) for a fresh model: seeded init (the same weights on every rank
    and every run), then `load_weights(model)` if given, optional compilation, optimizer, ZeRO wrapping."""
    from .model import Transformer, compile_blocks

    torch.manual_seed(train.seed)
    model = Transformer(model_cfg)
    num_parameters = sum(p.numel() for p in model.parameters())  # before ZeRO 3 partitions them
    if load_weights is not None:
        load_weights(model)
    if model_cfg.compile:
        compile_blocks(model)
    optimizer = build_optimizer(model, train, ds, device)
    config = deepspeed_config(train, ds, precision, train.micro_batch_size, grad_accum)
    engine = initialize_engine(model, optimizer, config, ds.stage)
    engine.checkpoint_engine = BackgroundWriter(background=train.async_checkpoint, digests=train.checkpoint_sha256)
    return engine, num_parameters


def model_for_tokenizer(model_cfg, pieces: int, seq_len: int, key: str, tokenizer: Path):
    """`model_cfg` with vocab_size from the tokenizer where unset; refuses a vocabulary smaller than the
    tokenizer's and `{key}.seq_len` beyond the model's max_seq_len."""
    model_cfg = replace(model_cfg, vocab_size=model_cfg.vocab_size or pieces)
    if model_cfg.vocab_size < pieces:
        raise PipelineError(f"the model's vocab_size={model_cfg.vocab_size} is smaller than the {pieces} pieces of "
                            f"{tokenizer}; leave model.vocab_size unset to take the tokenizer's")
    if seq_len > model_cfg.max_seq_len:
        raise PipelineError(f"{key}.seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len} of "
                            f"model={model_cfg.name}; lower {key}.seq_len")
    return model_cfg


def grad_accumulation(train: TrainConfig, world_size: int) -> int:
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise PipelineError(f"train.global_batch_size={train.global_batch_size} is not a multiple of "
                            f"train.micro_batch_size × data-parallel ranks = {train.micro_batch_size} × "
                            f"{world_size} = {per_step}")
    return train.global_batch_size // per_step


@dataclass
class TrainerState:
    step: int = 0  # optimizer updates done
    tokens_seen: int = 0
    loader: dict | None = None
    model: dict | None = None  # the ModelConfig that built the weights (export rebuilds it from here)
    nonfinite_skips: int = 0  # updates skipped for a non-finite loss or gradient norm
    spike_skips: int = 0  # updates skipped by the loss-spike guard
    consecutive_skips: int = 0
    loss_history: list = field(default_factory=list)  # spike guard: the last losses of applied updates


class Trainer:
    """Runs the loop for one stage; every rank constructs one."""

    def __init__(self, *, stage: str, engine, loader, eval_batches: Iterable, train: TrainConfig,
                 run_dir: Path, checkpoint_root: Path, metrics: MetricsLogger, flops_per_token: int,
                 tokens_per_step: int, device: torch.device, model_config: dict):
        self.stage, self.engine, self.loader, self.eval_batches = stage, engine, loader, eval_batches
        self.train, self.run_dir, self.checkpoint_root = train, run_dir, checkpoint_root
        self.metrics, self.flops_per_token, self.tokens_per_step = metrics, flops_per_token, tokens_per_step
        self.device = device
        self.model_config = model_config
        self.state = TrainerState(model=model_config)
        self.peak = peak_flops(device)
        self._preempt_agreed = False  # set by each step's control all-reduce
        self._save_in_flight: tuple[int, float, float] | None = None  # (step, start, seconds it blocked)

    # -- resume -----------------------------------------------------------------------------------
    def resume(self) -> None:
        """train.resume: auto (newest complete checkpoint of this run), none, or a folder."""
        choice = self.train.resume
        if choice == "none":
            self._set_aside_old_checkpoints()
            return
        if choice == "auto":  # sizes and sha256 of every file, hashed by all ranks together
            found = find_resumable(self.checkpoint_root, digests=True, collective=True)
            if found is None:
                return
            folder, record = found
        else:
            folder = Path(choice).expanduser().resolve()
            if not folder.is_dir():
                raise PipelineError(f"train.resume={choice!r} is not a checkpoint folder")
            record, problem = verify(folder, digests=True, collective=True)
            if record is None:  # DeepSpeed's files are pickles: never load what the record does not vouch for
                raise PipelineError(f"refusing to resume from {folder}: {problem}; give another checkpoint "
                                    f"folder, or train.resume=auto for the newest one that verifies")
        saved_model = (record or {}).get("trainer_state", {}).get("model")
        # switches that change how the model runs, not its weights, may differ across a resume
        runtime_only = {"name", "compile", "activation_checkpointing", "dropout"}
        changed = sorted(k for k in saved_model or {} if k not in runtime_only
                         and saved_model[k] != self.model_config.get(k))
        if changed:
            raise PipelineError(f"checkpoint {folder} was written for another model (differs in {changed}); "
                                f"use a new run_dir or train.resume=none")
        # Test hook: prove that the RNG and loader restores matter (the resume tests turn them off).
        skip = os.environ.get("PIPELINE_TEST_SKIP_RESTORE", "")
        trainer_state = load_checkpoint(self.engine, folder, restore_rng=skip != "rng")
        self.state = TrainerState(**{**trainer_state, "model": self.model_config})
        if skip != "loader":
            self.loader.load_state_dict(self.state.loader)
        log.info("%s: resumed from %s at step %d", self.stage, folder, self.state.step)
        self.metrics.rewind(self.state.step)

    def _set_aside_old_checkpoints(self) -> None:
        """A fresh start must not share a folder with an older run's checkpoints (resume=auto would
        later pick whichever has the higher step): they move to checkpoints.old-N, nothing is lost."""
        root = self.checkpoint_root
        if dist.get_rank() == 0 and root.is_dir() and any(root.iterdir()):
            number = 1
            while root.with_name(f"{root.name}.old-{number}").exists():
                number += 1
            root.rename(root.with_name(f"{root.name}.old-{number}"))
            log.info("%s: train.resume=none: earlier checkpoints moved to %s.old-%d", self.stage, root, number)
        dist.barrier()

    # -- loop -------------------------------------------------------------------------------------
    def fit(self) -> TrainerState:
        train, engine = self.train, self.engine
        loss_sum = torch.zeros((), device=self.device)
        steps_in_window, loss_steps, window_start = 0, 0, time.perf_counter()
        engine.train()
        while self.state.step < train.max_steps:
            lr = lr_at(self.state.step, train)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            micro_batches = self.loader.next_global_batch()
            step_loss = torch.zeros((), device=self.device)
            poison = _test_loss_factor(self.state.step + 1)
            for index, batch in enumerate(micro_batches):
                loss = self._forward(batch)
                if poison is not None and index == 0:
                    loss = loss * poison  # test hook: a NaN (or spiking) loss, and its gradients
                engine.backward(loss)
                step_loss += loss.detach() / len(micro_batches)
                if index < len(micro_batches) - 1:
                    engine.step()  # accumulation only: the last micro batch's step is the update
            skip = self._skip_reason(step_loss)  # collective: the same answer on every rank
            discarded = engine.skipped_steps
            with update_withheld(engine) if skip else nullcontext():
                engine.step()
            if not skip and engine.skipped_steps > discarded and not engine.fp16_enabled():
                # DeepSpeed's ZeRO and bf16 optimizers drop an update whose (global) gradient norm is not
                # finite; in fp16 that is routine loss scaling, counted in skipped_steps
                skip = "non-finite gradient norm"
            if skip:
                self._skipped(skip)
            else:
                self.state.consecutive_skips = 0
                loss_sum += step_loss
                loss_steps += 1
            self.state.step += 1
            self.state.tokens_seen += self.tokens_per_step
            steps_in_window += 1
            step = self.state.step
            if step % train.log_interval == 0 or step == train.max_steps:
                elapsed = time.perf_counter() - window_start
                self._log_train(loss_sum, steps_in_window, elapsed, lr, loss_steps)
                if self._save_in_flight is not None and self.engine.checkpoint_engine.idle():
                    self._wait_for_saves()  # written by now: its record need not wait for the next save
                loss_sum.zero_()
                steps_in_window, loss_steps, window_start = 0, 0, time.perf_counter()
            if step % train.eval_interval == 0 or step == train.max_steps:
                self.metrics.log({"step": step, "val_loss": self.evaluate(), "tokens_seen": self.state.tokens_seen})
            saved = None
            if step % train.save_interval == 0 or step == train.max_steps:
                saved = self.save()
            # step boundary: the ranks agreed on preemption in this step's control all-reduce (_skip_reason)
            if self._preempt_agreed and step < train.max_steps:
                saved = saved or self.save()
                self.finish_saves()
                self.metrics.finish()
                raise control.Preempted(f"{self.stage}: preempted at step {step}; checkpoint {saved}; "
                                        f"rerun the same command to resume")
            control.use_step_timeout()  # the first step (warm-up, compilation) ran under launch.timeout_s
        control.use_long_timeout()  # what follows the loop (final evals, the next stage) may take long
        self.finish_saves()
        return self.state

    def save(self) -> Path:
        """Start a checkpoint save; training goes on while the writer finishes it (finish_saves)."""
        self._wait_for_saves()
        self.state.loader = self.loader.state_dict()
        started = time.perf_counter()
        with control.long_timeout():  # writing to slow storage may outlast launch.step_timeout_s
            folder = save_checkpoint(self.engine, self.checkpoint_root, self.state.step, asdict(self.state),
                                     self.train.keep_last, timeout_s=control.long_timeout_s())
        self._save_in_flight = (self.state.step, started, time.perf_counter() - started)
        return folder

    def finish_saves(self) -> None:
        """Collective: returns once the last checkpoint started is complete (its record written)."""
        self._wait_for_saves()
        with control.long_timeout():
            dist.barrier()  # rank 0's writer commits last

    def _wait_for_saves(self) -> None:
        """Wait for this rank's writer, then record the save it finished (rank 0): how long it held up
        training and how long until its complete.json was written."""
        writer = self.engine.checkpoint_engine
        writer.wait()
        if self._save_in_flight is None:
            return
        step, started, blocked = self._save_in_flight
        self._save_in_flight = None
        if writer.committed_at is not None:  # rank 0 commits
            self.metrics.log({"step": step, "checkpoint_blocked_s": round(blocked, 3),
                              "checkpoint_complete_s": round(writer.committed_at - started, 3)})

    # -- skipped updates ----------------------------------------------------------------------------
    def _skip_reason(self, step_loss: torch.Tensor) -> str | None:
        """Why this step's update must not be applied, or None; collective, the same on every rank.
        Non-finite: the loss on any rank, or (ZeRO 0, whose gradients are all-reduced in full before the
        step, so every rank holds the same) the gradients. DeepSpeed's ZeRO optimizers check their
        partitioned gradients' norm themselves (fit). Spike: the global mean loss against the history."""
        checks = [step_loss]
        # (fp16: scaled gradients overflow routinely; DeepSpeed's loss scaler skips those steps itself)
        if self.engine.zero_optimization_stage() == 0 and not self.engine.fp16_enabled():
            norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32)
                     for p in self.engine.module.parameters() if p.grad is not None]
            if norms:
                checks.append(torch.linalg.vector_norm(torch.stack(norms)))
        bad = (~torch.isfinite(torch.stack(checks))).tolist()  # the one host sync of the step
        # the step's one control-plane collective; the preemption flag is acted on at the step boundary
        flags = control.agree({"nonfinite_loss": bad[0], "nonfinite_grad": any(bad[1:]),
                               control.PREEMPT: control.preempt_requested() is not None})
        self._preempt_agreed = flags[control.PREEMPT]
        if flags["nonfinite_loss"] or flags["nonfinite_grad"]:
            return "non-finite loss" if flags["nonfinite_loss"] else "non-finite gradient norm"
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

    def _skipped(self, reason: str) -> None:
        """Count an update every rank skipped; stop when train.nonfinite or max_nonfinite_skips says so."""
        step, train, state = self.state.step + 1, self.train, self.state
        spike = reason.startswith("loss spike")
        state.consecutive_skips += 1
        if spike:
            state.spike_skips += 1
        else:
            state.nonfinite_skips += 1
        if dist.get_rank() == 0:
            log.warning("%s: step %d: %s; the update is skipped on every rank", self.stage, step, reason)
        self.metrics.log({"step": step, "skipped_update": reason, "nonfinite_skips": state.nonfinite_skips,
                          "spike_skips": state.spike_skips, "consecutive_skips": state.consecutive_skips})
        key = "train" if self.stage == "pretrain" else self.stage
        if state.consecutive_skips > train.max_nonfinite_skips:
            why = (f"{state.consecutive_skips} updates in a row skipped, the last at step {step} for a {reason} "
                   f"({key}.max_nonfinite_skips={train.max_nonfinite_skips})")
        elif not spike and train.nonfinite == "stop":
            why = f"{reason} at step {step} ({key}.nonfinite=stop)"
        else:
            return
        self.finish_saves()
        found = find_resumable(self.checkpoint_root)
        good = f"the last good checkpoint is {found[0]}" if found else "there is no complete checkpoint yet"
        raise PipelineError(f"{self.stage}: {why}; {good}: lower {key}.lr or check the data, then rerun "
                            f"(train.resume=auto continues from it)")

    def _forward(self, batch) -> torch.Tensor:
        """The loss of one micro batch (inputs, labels[, segments of packed examples])."""
        inputs, labels, *segments = (t.to(self.device, non_blocking=True) for t in batch)
        _, loss = self.engine(inputs, labels, segments=segments[0] if segments else None)
        return loss

    @torch.no_grad()
    def evaluate(self) -> float | None:
        self.engine.eval()
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        for batch in self.eval_batches:  # re-iterable: the same batches every time
            loss = self._forward(batch)
            total += torch.stack([loss.detach().double(), torch.ones((), device=self.device, dtype=torch.float64)])
        dist.all_reduce(total)
        self.engine.train()
        return (total[0] / total[1]).item() if total[1] > 0 else None

    def _log_train(self, loss_sum: torch.Tensor, steps: int, elapsed: float, lr: float, loss_steps: int) -> None:
        # the mean over the window's applied updates (a skipped one's loss may be NaN); NaN if none
        loss = loss_sum.clone() / loss_steps if loss_steps else torch.full((), math.nan, device=self.device)
        dist.all_reduce(loss)
        loss = loss.item() / dist.get_world_size()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        tokens_per_s = self.tokens_per_step * steps / elapsed
        achieved = tokens_per_s * self.flops_per_token
        grad_norm = self.engine.get_global_grad_norm()
        self.metrics.log({
            "step": self.state.step, "loss": loss, "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(achieved / (self.peak * dist.get_world_size()), 4) if self.peak else None,
            "step_time_s": round(elapsed / steps, 4),
            "tokens_seen": self.state.tokens_seen,
            "memory_gb": round(_memory_bytes(self.device) / 2**30, 3),
            "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
            "nonfinite_skips": self.state.nonfinite_skips, "spike_skips": self.state.spike_skips,
        })


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS of this rank


@contextmanager
def update_withheld(engine):
    """engine.step() that leaves the weights and the optimizer state as they were, on every ZeRO stage.
    DeepSpeed has no public way to drop an update outside fp16 loss scaling, and its wrapper's step must
    still run (gradient reduction, clipping, freeing and re-gathering partitions are collectives every rank
    joins; its counters advance), so only the inner optimizer's step, where weights, Adam's moments and
    its step count change, is a no-op for this one call."""
    inner = [o for o in (engine.basic_optimizer, getattr(engine.optimizer, "backup_optimizer", None)) if o is not None]
    linked = getattr(engine.optimizer, "_hp_optimizer_states_linked", None)
    for optimizer in inner:
        optimizer.step = _no_update
    try:
        yield
    finally:
        for optimizer in inner:
            del optimizer.step  # the class's own step again
        if linked is False:  # DeepSpeed links its views of the optimizer state after the first real update
            engine.optimizer._hp_optimizer_states_linked = False


def _no_update(*args, **kwargs) -> None:
    return None


def _test_loss_factor(step: int) -> float | None:
    """Test hook, PIPELINE_TEST_NAN_AT=STEP[-LAST]:RANK[:FACTOR][,...]: at those steps this rank's first
    micro batch loss is multiplied by FACTOR (default nan; e.g. 1000 for a loss spike)."""
    spec = os.environ.get("PIPELINE_TEST_NAN_AT", "")
    for item in filter(None, spec.split(",")):
        steps, rank, *factor = item.split(":")
        first, _, last = steps.partition("-")
        if int(first) <= step <= int(last or first) and int(rank) == dist.get_rank():
            return float(factor[0]) if factor else math.nan
    return None
