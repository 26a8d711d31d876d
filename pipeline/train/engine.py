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

from ..checkpoint.writer import BackgroundWriter
from ..cluster import control
from ..config import DeepSpeedConfig, LaunchConfig, OptimizerConfig, PrecisionConfig, TrainConfig
from ..errors import PipelineError
from ..redaction import redact

log = logging.getLogger(__name__)


def init_distributed(launch: LaunchConfig) -> torch.device:
    """Join the process group the launcher described (torchrun, deepspeed or srun variables)."""
    import deepspeed

    from ..cluster.distributed import export_torch_env

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


def muon_split(model: torch.nn.Module, opt: OptimizerConfig) -> tuple[list[str], list[str]]:
    """(Muon's parameter names, AdamW's): Muon takes the 2-D matrices not named by optimizer.adamw_params
    (by prefix); 1-D tensors (norms) stay on AdamW, as Muon is defined on matrices only."""
    prefixes = list(opt.adamw_params)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    unmatched = [x for x in prefixes if not any(n == x or n.startswith(x + ".") for n in names)]
    if unmatched:
        raise PipelineError(f"optimizer.adamw_params={prefixes}: {unmatched} match no parameter of the model "
                            f"(its 2-D parameters: {[n for n, p in model.named_parameters() if p.ndim == 2][:8]} ...)")
    params = dict(model.named_parameters())
    muon = [n for n in names if params[n].ndim == 2
            and not any(n == x or n.startswith(x + ".") for x in prefixes)]
    if not muon:
        raise PipelineError(f"optimizer=muon with optimizer.adamw_params={prefixes} leaves no matrix to Muon")
    return muon, [n for n in names if n not in muon]


def build_optimizer(model: torch.nn.Module, train: TrainConfig, ds: DeepSpeedConfig, device: torch.device,
                    opt: OptimizerConfig | None = None):
    if opt is not None and opt.name == "muon":
        return build_muon(model, train, opt, device)
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


def build_muon(model: torch.nn.Module, train: TrainConfig, opt: OptimizerConfig, device: torch.device):
    """DeepSpeed's MuonWithAuxAdam, the class its ZeRO 1/2/3 optimizers recognise: they read `use_muon` from
    each parameter and group and orthogonalise the (partitioned) gradients themselves. Built here rather than
    from a DeepSpeed "optimizer" section, whose split is by name ("embed", "lm_head") and would put our
    output head on Muon. The AdamW half is the optimizer optimizer=adamw uses, with train.*'s settings."""
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    muon_names, _ = muon_split(model, opt)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    matrices, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        param.use_muon = name in muon_names  # what DeepSpeed's ZeRO optimizers test
        if param.use_muon:
            matrices.append(param)
        else:
            (no_decay if param.ndim < 2 or id(param) in embeddings else decay).append(param)
    adam = dict(use_muon=False, lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps)
    wd = train.weight_decay if opt.muon_weight_decay is None else opt.muon_weight_decay
    # lr_ratio: the trainer sets every group's lr to schedule × this (absent: × 1)
    groups = [dict(params=matrices, use_muon=True, lr=train.lr * opt.muon_lr_ratio, lr_ratio=opt.muon_lr_ratio,
                   momentum=opt.momentum, weight_decay=wd, ns_method=opt.ns_method),
              dict(params=decay, weight_decay=train.weight_decay, **adam),
              dict(params=no_decay, weight_decay=0.0, **adam)]
    groups = [g for g in groups if g["params"]]
    if device.type == "cuda":
        from deepspeed.ops.adam import FusedAdam

        return MuonWithAuxAdam(groups, adam_optimizer=FusedAdam, adam_optimizer_kwargs=dict(adam_w_mode=True),
                               fallback_to_inline=True)  # FusedAdam's op failed to build: Muon's own Adam
    return MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW)


def deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, precision: PrecisionConfig,
                     micro_batch: int, grad_accum: int, opt: OptimizerConfig | None = None) -> dict:
    zero: dict = {"stage": ds.stage}
    if ds.stage > 0:
        zero.update(overlap_comm=ds.overlap_comm, contiguous_gradients=ds.contiguous_gradients,
                    reduce_bucket_size=ds.reduce_bucket_size)
        if ds.stage < 3:
            zero["allgather_bucket_size"] = ds.allgather_bucket_size
        elif opt is not None and opt.name == "muon":
            zero["reduce_scatter"] = False  # DeepSpeed's ZeRO 3 refuses Muon with it (it needs full gradients)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        if ds.stage != 3:
            raise PipelineError("deepspeed.offload_param needs ZeRO stage 3: use deepspeed=zero3_offload")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": muon_clip(train, opt),
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


def muon_clip(train: TrainConfig, opt: OptimizerConfig | None) -> float:
    """DeepSpeed's gradient_clipping. Under Muon its ZeRO optimizers take the norm over the orthogonalised
    Muon updates with the AdamW gradients (about 30 for the tiny model, whatever the gradients), so clipping
    at train.grad_clip=1 would shrink every step about 30×: off unless optimizer.muon_grad_clip=true."""
    if opt is not None and opt.name == "muon" and not opt.muon_grad_clip:
        return 0.0
    return train.grad_clip


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
                 device: torch.device, accumulation: int, load_weights=None,
                 opt: OptimizerConfig | None = None) -> tuple[object, int]:
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
    optimizer = build_optimizer(model, train, ds, device, opt)
    config = deepspeed_config(train, ds, precision, train.micro_batch_size, accumulation, opt)
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
    # Muon's momentum moves outside the inner step: ZeRO 1/2 fold the gradient into it while partitioning
    # and commit it in the wrapper's step, ZeRO 3 orthogonalises there before the inner step. Put it back.
    momentum = {key: state["momentum_buffer"].clone() for key, state in _muon_states(engine.basic_optimizer)}
    for optimizer in inner:
        optimizer.step = _no_update
    try:
        yield
    finally:
        for optimizer in inner:
            del optimizer.step  # the class's own step again
        for key, state in _muon_states(engine.basic_optimizer):
            if key in momentum:
                state["momentum_buffer"].copy_(momentum[key])
            else:  # created by this step: a fresh buffer starts at zero
                state["momentum_buffer"].zero_()
        if linked is False:  # DeepSpeed links its views of the optimizer state after the first real update
            engine.optimizer._hp_optimizer_states_linked = False


def _muon_states(optimizer):
    return [(id(state), state) for state in optimizer.state.values() if "momentum_buffer" in state]


def _no_update(*args, **kwargs) -> None:
    return None
