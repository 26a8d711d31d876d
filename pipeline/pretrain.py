"""`pretrain` stage: the Llama model on the shards, every rank under a launcher (or local ranks we start)."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from .checkpoint import RECORD, find_resumable
from .config import optimizer_inputs
from .context import Context
from .fsutil import sha256_file

log = logging.getLogger(__name__)


# -- the stage's face ------------------------------------------------------------------------------------
def inputs(ctx: Context) -> dict:
    cfg, layout = ctx.cfg, ctx.layout
    digest = {path: sha256_file(path) if path.is_file() else "missing" for path in (layout.manifest, layout.tokenizer)}
    train = asdict(cfg.train)
    if not train["document_mask"]:
        del train["document_mask"]  # the behaviour from before the key existed: such runs are not redone
    return {"model": asdict(cfg.model), "train": train, "deepspeed": asdict(cfg.deepspeed),
            "precision": asdict(cfg.precision), "shards": digest[layout.manifest], "tokenizer": digest[layout.tokenizer],
            **optimizer_inputs(cfg.optimizer)}


def preflight(ctx: Context) -> None:
    """Before local ranks start: the manifest, the tokenizer and the file sizes (cheap; hashing every
    shard is left to the ranks)."""
    from .data import open_split

    verify = "off" if ctx.cfg.train.verify_shards == "off" else "size"
    for split in ("train", "val"):
        open_split(ctx.layout.shards, split, ctx.layout.tokenizer, verify, required=split == "train")


def run(ctx: Context) -> list[Path]:
    train_model(ctx)
    found = find_resumable(ctx.layout.checkpoints("pretrain"))
    return [found[0] / RECORD] if found else []


def train_model(ctx: Context) -> None:
    import torch.distributed as dist

    from . import autobatch
    from .batching import BatchLayout
    from .data import PretrainLoader, eval_batches, open_split
    from .engine import build_engine, init_distributed, model_for_tokenizer
    from .faults import injected
    from .metrics import MetricsLogger
    from .model import flops_per_token
    from .trainer import Trainer
    from .vocab import load_tokenizer

    cfg, layout = ctx.cfg, ctx.layout
    device = init_distributed(cfg.launch)
    rank, world = dist.get_rank(), dist.get_world_size()
    train = cfg.train
    sp = load_tokenizer(layout.tokenizer)
    model_cfg = model_for_tokenizer(cfg.model, sp.get_piece_size(), train.seq_len, "train", layout.tokenizer)
    stream = open_split(layout.shards, "train", layout.tokenizer, verify=train.verify_shards)
    # micro_batch_size=auto: probed now, before the loader and the engine are built from it
    train = autobatch.resolve(train, "train", model_cfg, cfg.deepspeed, cfg.precision, device)
    batch = BatchLayout.of(train, "train", world)
    loader = PretrainLoader(stream, train.seq_len, train.micro_batch_size, train.global_batch_size,
                            dp_rank=rank, dp_world=world, seed=train.seed, pin_memory=device.type == "cuda",
                            document_mask=train.document_mask)
    val = open_split(layout.shards, "val", layout.tokenizer, verify=train.verify_shards, required=False)
    engine, num_parameters = build_engine(model_cfg, train, cfg.deepspeed, cfg.precision, device, batch.accumulation,
                                          opt=cfg.optimizer)
    # built now so that a validation split too small for one batch fails before training, not after
    eval_set = [] if val is None else eval_batches(val, train.seq_len, train.micro_batch_size, train.eval_batches,
                                                   rank, world, document_mask=train.document_mask)
    metrics = MetricsLogger(layout.run_dir, "pretrain", rank == 0, cfg.logging.wandb, ctx.resolved)
    trainer = Trainer(stage="pretrain", section="train", engine=engine, loader=loader, eval_batches=eval_set,
                      train=train, checkpoint_root=layout.checkpoints("pretrain"), metrics=metrics,
                      flops_per_token=flops_per_token(model_cfg, train.seq_len), device=device,
                      model_config=asdict(model_cfg), faults=injected(),
                      optimizer=cfg.optimizer.name)
    if rank == 0:
        log.info("pretrain: model=%s, %.2fM parameters, %d ranks × micro batch %d × %d accumulation, "
                 "ZeRO %d, %s", model_cfg.name, num_parameters / 1e6, world,
                 train.micro_batch_size, batch.accumulation, cfg.deepspeed.stage, cfg.precision.name)
    trainer.resume()
    if trainer.state.step >= train.max_steps:
        log.info("pretrain: already at step %d of train.max_steps=%d", trainer.state.step, train.max_steps)
    else:
        trainer.fit()
    metrics.finish()
