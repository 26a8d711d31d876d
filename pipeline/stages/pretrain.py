"""`pretrain` stage: the Llama model on the shards, every rank under a launcher (or local ranks we start)."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from ..checkpoint.store import RECORD, find_resumable
from ..config import optimizer_inputs
from ..fsutil import sha256_file
from .context import Context

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
            **mixture_inputs(cfg.data),
            **optimizer_inputs(cfg.optimizer)}


def mixture_inputs(data) -> dict:
    """The blend's settings; none for a run of one source (whose stage records predate mixtures)."""
    if len(data.sources) < 2 and not data.phases:
        return {}
    return {"mixture": {"weights": {n: s.weight for n, s in data.sources.items()}, "phases": [asdict(p) for p in
            data.phases], "max_repetitions": data.max_repetitions}}


def preflight(ctx: Context) -> None:
    """Before local ranks start: the manifest, the tokenizer and the file sizes (cheap; hashing every
    shard is left to the ranks)."""
    from ..data.mixture import open_mixture, plan
    from ..data.stream import manifest_sources, open_split

    cfg = ctx.cfg
    verify = "off" if cfg.train.verify_shards == "off" else "size"
    _, blend, windows = open_mixture(ctx.layout.shards, ctx.layout.tokenizer, cfg.data, ctx.layout.default_data,
                                     cfg.train.seq_len, cfg.train.global_batch_size, verify)
    for name in manifest_sources(ctx.layout.shards):
        open_split(ctx.layout.shards, "val", ctx.layout.tokenizer, verify, required=False, source=name)
    # checked here, before ranks start; rank 0 logs the plan
    plan(blend, windows, cfg.train.seq_len, cfg.train.max_steps, cfg.train.global_batch_size, cfg.data.max_repetitions,
         echo=False)


def run(ctx: Context) -> list[Path]:
    train_model(ctx)
    found = find_resumable(ctx.layout.checkpoints("pretrain"))
    return [found[0] / RECORD] if found else []


def train_model(ctx: Context) -> None:
    import torch.distributed as dist

    from ..data.batching import BatchLayout
    from ..data.mixture import MixtureLoader, open_mixture, plan, source_eval_batches
    from ..data.vocab import load_tokenizer
    from ..faults import injected
    from ..observe.metrics import MetricsLogger
    from ..train import autobatch
    from ..train.engine import build_engine, init_distributed, model_for_tokenizer
    from ..train.model import flops_per_token
    from ..train.trainer import Trainer

    cfg, layout = ctx.cfg, ctx.layout
    device = init_distributed(cfg.launch)
    rank, world = dist.get_rank(), dist.get_world_size()
    train = cfg.train
    sp = load_tokenizer(layout.tokenizer)
    model_cfg = model_for_tokenizer(cfg.model, sp.get_piece_size(), train.seq_len, "train", layout.tokenizer)
    streams, blend, windows = open_mixture(layout.shards, layout.tokenizer, cfg.data, layout.default_data,
                                           train.seq_len, train.global_batch_size, train.verify_shards)
    # micro_batch_size=auto: probed now, before the loader and the engine are built from it
    train = autobatch.resolve(train, "train", model_cfg, cfg.deepspeed, cfg.precision, device)
    batch = BatchLayout.of(train, "train", world)
    if rank == 0:
        plan(blend, windows, train.seq_len, train.max_steps, train.global_batch_size, cfg.data.max_repetitions)
    loader = MixtureLoader(streams, blend, train.seq_len, train.micro_batch_size, train.global_batch_size,
                           dp_rank=rank, dp_world=world, seed=train.seed, pin_memory=device.type == "cuda",
                           document_mask=train.document_mask)
    engine, num_parameters = build_engine(model_cfg, train, cfg.deepspeed, cfg.precision, device, batch.accumulation,
                                          opt=cfg.optimizer)
    # built now so that a validation split too small for one batch fails before training, not after
    eval_set = source_eval_batches(layout.shards, layout.tokenizer, blend.names, train.seq_len,
                                   train.micro_batch_size, train.eval_batches, rank, world, train.verify_shards,
                                   document_mask=train.document_mask)
    metrics = MetricsLogger(layout.run_dir, "pretrain", rank == 0, cfg.logging.wandb, ctx.resolved)
    trainer = Trainer(stage="pretrain", section="train", engine=engine, loader=loader, eval_batches=eval_set,
                      train=train, checkpoint_root=layout.checkpoints("pretrain"), metrics=metrics,
                      flops_per_token=flops_per_token(model_cfg, train.seq_len), device=device,
                      model_config=asdict(model_cfg), faults=injected(),
                      optimizer=cfg.optimizer.name, eval_weights=dict(zip(blend.names, blend.shares[-1])))
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
