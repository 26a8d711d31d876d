"""The DeepSpeed engine that pretrain and finetune train with: ZeRO stage, precision, optimizer.

Parallelism is applied here, outside the model: the model is a plain nn.Module and
`deepspeed.initialize` wraps it with the ZeRO stage and precision from the config groups.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from . import control
from .checkpoint_writer import BackgroundWriter
from .config import DeepSpeedConfig, LaunchConfig, PrecisionConfig, TrainConfig
from .errors import PipelineError
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
                 device: torch.device, accumulation: int, load_weights=None) -> tuple[object, int]:
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
    config = deepspeed_config(train, ds, precision, train.micro_batch_size, accumulation)
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
