"""`pretrain` stage: setup → main → fit. Every rank runs this under a launcher (or one we start)."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from . import autobatch
from .config import PipelineConfig
from .metrics import MetricsLogger
from .tokenizer import load_tokenizer
from .train import Trainer, build_engine, grad_accumulation, init_distributed, model_for_tokenizer

log = logging.getLogger(__name__)


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "pretrain" / "checkpoints"


def main(cfg: PipelineConfig, run_dir: Path, resolved_config: dict) -> None:
    from .data import EvalBatches, PretrainLoader, open_split
    from .model import flops_per_token

    device = init_distributed(cfg.launch)
    rank, world = dist.get_rank(), dist.get_world_size()
    train = cfg.train
    sp = load_tokenizer(run_dir / "tokenizer" / "tokenizer.model")
    tokenizer_path = run_dir / "tokenizer" / "tokenizer.model"
    model_cfg = model_for_tokenizer(cfg.model, sp.get_piece_size(), train.seq_len, "train", tokenizer_path)
    shards = run_dir / "shards"
    stream = open_split(shards, "train", tokenizer_path, verify=train.verify_shards)
    # micro_batch_size=auto: probed now, before the loader and the engine are built from it
    train = autobatch.resolve(train, "train", model_cfg, cfg.deepspeed, cfg.precision, device)
    grad_accum = grad_accumulation(train, world)
    loader = PretrainLoader(stream, train.seq_len, train.micro_batch_size, train.global_batch_size,
                            dp_rank=rank, dp_world=world, seed=train.seed, pin_memory=device.type == "cuda")
    val = open_split(shards, "val", tokenizer_path, verify=train.verify_shards, required=False)

    engine, num_parameters = build_engine(model_cfg, train, cfg.deepspeed, cfg.precision, device, grad_accum)

    # built now so that a validation split too small for one batch fails before training, not after
    eval_set = [] if val is None else EvalBatches(val, train.seq_len, train.micro_batch_size, train.eval_batches,
                                                  rank, world)

    metrics = MetricsLogger(run_dir, "pretrain", rank == 0, cfg.logging.wandb, resolved_config)
    trainer = Trainer(stage="pretrain", engine=engine, loader=loader, eval_batches=eval_set, train=train,
                      run_dir=run_dir, checkpoint_root=checkpoint_root(run_dir), metrics=metrics,
                      flops_per_token=flops_per_token(model_cfg, train.seq_len),
                      tokens_per_step=train.global_batch_size * train.seq_len, device=device,
                      model_config=asdict(model_cfg))
    if rank == 0:
        log.info("pretrain: model=%s, %.2fM parameters, %d ranks × micro batch %d × %d accumulation, "
                 "ZeRO %d, %s", model_cfg.name, num_parameters / 1e6, world,
                 train.micro_batch_size, grad_accum, cfg.deepspeed.stage, cfg.precision.name)
    trainer.resume()
    if trainer.state.step >= train.max_steps:
        log.info("pretrain: already at step %d of train.max_steps=%d", trainer.state.step, train.max_steps)
    else:
        trainer.fit()
    metrics.finish()
