"""`finetune` stage: supervised fine-tuning on the pretrain engine (DeepSpeed ZeRO, precision, Trainer).

Weights come from `finetune.init`: `pretrain` (this run's newest complete pretrain checkpoint, read by the
checkpoint reader in fp32, so any ZeRO stage loads into any other) or an HF LlamaForCausalLM folder
(config.json + safetensors, never pickle). Only weights: the optimizer starts fresh. An interrupted
fine-tune resumes from its own checkpoints (`finetune.resume=auto`), which takes precedence over init.

Before and after training, held-out questions are answered greedily and compared exactly with their
reference answers (exact_match.py); both accuracies go to metrics.jsonl and the log.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..checkpoint.store import RECORD, find_resumable
from ..config import FinetuneConfig, ModelConfig, optimizer_inputs
from ..data.corpus import files_fingerprint, resolve_paths
from ..errors import PipelineError
from ..fsutil import sha256_file
from ..layout import RunLayout
from .context import Context

log = logging.getLogger(__name__)


# -- the stage's face ------------------------------------------------------------------------------------
def inputs(ctx: Context) -> dict:
    """Everything the finetune stage's outputs depend on, for the runner's skip record."""
    cfg, layout, ft = ctx.cfg, ctx.layout, ctx.cfg.finetune
    if ft.init == "pretrain":
        found = find_resumable(layout.checkpoints("pretrain"))
        init = {"pretrain": sha256_file(found[0] / RECORD) if found else "missing"}
    else:
        folder = Path(ft.init).expanduser()
        init = {"hf": files_fingerprint(sorted(p for p in folder.glob("*") if p.is_file())) if folder.is_dir()
                else "missing"}
    if ft.data.paths:
        try:
            data = files_fingerprint(resolve_paths(list(ft.data.paths)))
        except PipelineError:
            data = "missing"  # the stage itself reports it
    else:
        data = {"default": {"seed": cfg.data.seed, "documents": cfg.data.default_num_documents}}
    tokenizer = layout.tokenizer
    finetune = asdict(ft)
    del finetune["document_mask"]  # always false here (pack_isolate isolates): runs from before it are not redone
    return {"model": asdict(cfg.model), "finetune": finetune, "deepspeed": asdict(cfg.deepspeed),
            "precision": asdict(cfg.precision), "init": init, "data": data,
            "tokenizer": sha256_file(tokenizer) if tokenizer.is_file() else "missing", **optimizer_inputs(cfg.optimizer)}


def preflight(ctx: Context, pretrain_runs_first: bool) -> None:
    """Before local ranks start: the init weights must exist, unless this run's pretrain makes them."""
    ft = ctx.cfg.finetune
    if ft.init != "pretrain" or not pretrain_runs_first:
        resolve_init(ft, ctx.cfg.model, ctx.layout, need_weights=not will_resume(ft, ctx.layout))


def run(ctx: Context) -> list[Path]:
    train_model(ctx)
    found = find_resumable(ctx.layout.checkpoints("finetune"))
    return [found[0] / RECORD] if found else []


# -- where the weights come from ----------------------------------------------------------------

@dataclass
class InitSource:
    kind: str  # "pretrain" | "hf"
    path: Path  # the pretrain checkpoint folder, or the HF folder
    model: ModelConfig  # vocab_size None: taken from the tokenizer
    tokenizer: Path


def resolve_init(ft: FinetuneConfig, run_model: ModelConfig, layout: RunLayout, need_weights: bool = True) -> InitSource:
    """What finetune.init names, checked before any work. With need_weights=False (resuming) a missing
    pretrain checkpoint is no error: only the architecture is needed then. `run_model`: model=, the
    pretrain stage's architecture (and the runtime switches an HF init keeps)."""
    init, pretrain_root = ft.init, layout.checkpoints("pretrain")
    if init == "pretrain":
        # the weights are unpickled next: inside the ranks (collective) every file's sha256 must verify
        found = find_resumable(pretrain_root, digests=need_weights and _in_process_group(), collective=True)
        if found is None and need_weights:
            raise PipelineError(f"finetune.init=pretrain: no complete pretrain checkpoint under {pretrain_root}: "
                                f"run stages=[pretrain] first, or set finetune.init=/path/to/hf/folder")
        return InitSource("pretrain", found[0] if found else pretrain_root, run_model, layout.tokenizer)
    folder = Path(init).expanduser().resolve()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PipelineError(f"finetune.init={init!r}: {config_path} does not exist; give `pretrain` or an HF "
                            f"LlamaForCausalLM export folder")
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"finetune.init={init!r}: {config_path} is unreadable ({exc})") from None
    from ..hf.llama import model_config_from_hf

    try:
        model = model_config_from_hf(hf_config)
    except ValueError as exc:
        raise PipelineError(f"finetune.init={init!r} is not a LlamaForCausalLM export this pipeline can load: "
                            f"{exc}") from None
    model = replace(model, dropout=run_model.dropout, activation_checkpointing=run_model.activation_checkpointing,
                    compile=run_model.compile)
    if need_weights:
        _safetensors_files(folder)  # fail now, not after the data is built
    tokenizer = folder / "tokenizer.model"  # the export ships its SentencePiece model; else this run's
    return InitSource("hf", folder, model, tokenizer if tokenizer.is_file() else layout.tokenizer)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise PipelineError(f"{index} is unreadable ({exc!r})") from None
        files = [folder / name for name in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise PipelineError(f"{index} lists missing shard(s) {missing}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise PipelineError(f"{folder} has no model.safetensors (or model.safetensors.index.json); only safetensors "
                        f"weights are loaded, never pickled .bin files")


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_initialized()


def init_state_dict(source: InitSource, model_cfg: ModelConfig) -> dict:
    """The init weights as our state dict, on the CPU."""
    if source.kind == "hf":
        from safetensors.torch import load_file

        from ..hf.llama import from_hf_state_dict

        hf_state = {}
        for path in _safetensors_files(source.path):
            hf_state.update(load_file(str(path)))
        try:
            return from_hf_state_dict(hf_state, model_cfg)
        except ValueError as exc:
            raise PipelineError(f"{source.path}: {exc}") from None
    from ..checkpoint.reader import consolidated_weights

    return consolidated_weights(source.path)


def load_init_weights(model, source: InitSource) -> None:
    state = init_state_dict(source, model.cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:600]
        hint = "model= must be the pretrain stage's" if source.kind == "pretrain" else "the folder's config.json " \
                                                                                        "disagrees with its weights"
        raise PipelineError(f"the weights of {source.path} do not fit the model ({hint}): {detail}") from None


def will_resume(ft: FinetuneConfig, layout: RunLayout) -> bool:
    if ft.resume == "none":
        return False
    return ft.resume != "auto" or find_resumable(layout.checkpoints("finetune")) is not None


def train_model(ctx: Context) -> None:
    import torch.distributed as dist

    from ..data import sft as sft_data
    from ..data.batching import BatchLayout
    from ..data.vocab import load_tokenizer
    from ..faults import injected
    from ..observe.metrics import MetricsLogger
    from ..train import autobatch
    from ..train.engine import build_engine, init_distributed, model_for_tokenizer
    from ..train.exact_match import describe_accuracy, log_exact_match
    from ..train.model import flops_per_token
    from ..train.trainer import Trainer

    cfg, layout, ft = ctx.cfg, ctx.layout, ctx.cfg.finetune
    device = init_distributed(cfg.launch)
    rank, world = dist.get_rank(), dist.get_world_size()
    resuming = will_resume(ft, layout)
    source = resolve_init(ft, cfg.model, layout, need_weights=not resuming)
    sp = load_tokenizer(source.tokenizer)
    model_cfg = model_for_tokenizer(source.model, sp.get_piece_size(), ft.seq_len, "finetune", source.tokenizer)
    if not ft.data.paths:  # the built-in instruction set: written with the default corpus (rank 0 only)
        if rank == 0:
            ctx.write_default_data()
        dist.barrier()
    data = sft_data.build(ft.data, layout.default_data, sp, ft.seq_len, ft.pack, ft.eval_exact_match,
                          ft.pack_isolate)
    # micro_batch_size=auto: probed now, before the loaders and the engine are built from it
    ft = autobatch.resolve(ft, "finetune", model_cfg, cfg.deepspeed, cfg.precision, device)
    batch = BatchLayout.of(ft, "finetune", world)
    pin = device.type == "cuda"
    loader = sft_data.SFTLoader(data.train, ft.micro_batch_size, ft.global_batch_size, dp_rank=rank, dp_world=world,
                                seed=ft.seed, pin_memory=pin)
    if not ft.pack:
        data.train.stats.padding_fraction = loader.epoch_padding_fraction()
    eval_set = sft_data.sft_eval_batches(data.held_out, ft.micro_batch_size, ft.eval_batches, rank, world, pin)
    engine, num_parameters = build_engine(model_cfg, ft, cfg.deepspeed, cfg.precision, device, batch.accumulation,
                                          None if resuming else lambda model: load_init_weights(model, source),
                                          opt=cfg.optimizer)
    metrics = MetricsLogger(layout.run_dir, "finetune", rank == 0, cfg.logging.wandb, ctx.resolved)
    trainer = Trainer(stage="finetune", section="finetune", engine=engine, loader=loader, eval_batches=eval_set,
                      train=ft, checkpoint_root=layout.checkpoints("finetune"), metrics=metrics,
                      flops_per_token=flops_per_token(model_cfg, ft.seq_len), device=device,
                      model_config=asdict(model_cfg), faults=injected(),
                      optimizer=cfg.optimizer.name)
    if rank == 0:
        held = data.held_out.stats.describe() if data.held_out else "none"
        log.info("finetune: %s from %s; train: %s; held-out: %s; %d exact-match questions", data.description,
                 "its last checkpoint (resume)" if resuming else f"{source.kind} weights {source.path}",
                 data.train.stats.describe(), held, len(data.questions))
        log.info("finetune: model %.2fM parameters, %d ranks × micro batch %d × %d accumulation, ZeRO %d, %s, "
                 "%s sequences of %d tokens", num_parameters / 1e6, world, ft.micro_batch_size, batch.accumulation,
                 cfg.deepspeed.stage, cfg.precision.name, "packed" if ft.pack else "unpacked", ft.seq_len)
    trainer.resume()

    def exact_match(step: int, when: str):
        return log_exact_match(metrics, engine.module, data.questions, sp, ft.max_new_tokens,
                               layout.exact_match_answers(when), device, step, when)

    before = exact_match(0, "before") if trainer.state.step == 0 else None
    if trainer.state.step >= ft.max_steps:
        log.info("finetune: already at step %d of finetune.max_steps=%d", trainer.state.step, ft.max_steps)
    else:
        trainer.fit()
    after = exact_match(trainer.state.step, "after")
    if after is not None:  # rank 0
        log.info("finetune: exact match on %d held-out questions: before %s, after %s", len(data.questions),
                 describe_accuracy(before), describe_accuracy(after))
    metrics.finish()
