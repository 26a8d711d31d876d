"""Checks on the config that need no data, run before any stage does work (the schema is pipeline/config.py)."""
from __future__ import annotations

import math
import re
from pathlib import Path

from .config import (
    EVAL_DTYPES,
    EVAL_SOURCES,
    MISSING_EOS,
    NS_METHODS,
    OPTIMIZERS,
    SCHEDULES,
    STAGES,
    TRAINING_KEYS,
    VERIFY_MODES,
    DeepSpeedConfig,
    EvalConfig,
    OptimizerConfig,
    PipelineConfig,
    TrainConfig,
)
from .data.batching import AUTO, BatchLayout
from .data.vocab import MIN_VOCAB
from .errors import PipelineError


def validate(cfg: PipelineConfig) -> None:
    """Checks that need no data, run before any stage does work."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown} in stages=; choose from {list(STAGES)}")
    if not cfg.stages:
        raise PipelineError(f"stages=[] runs nothing; name one or more of {list(STAGES)} (or drop stages= for all)")
    if cfg.data.source not in ("default", "files"):
        raise PipelineError(f"data.source={cfg.data.source!r}: use data=default or data=files")
    validate_mixture(cfg)
    if not 0 <= cfg.data.val_fraction < 1:
        raise PipelineError(f"data.val_fraction={cfg.data.val_fraction} must lie in [0, 1)")
    if cfg.tokenizer.model_type not in ("bpe", "unigram"):
        raise PipelineError(f"tokenizer.model_type={cfg.tokenizer.model_type!r}: choose bpe or unigram")
    if cfg.tokenizer.max_sample_mb < 0:
        raise PipelineError(f"tokenizer.max_sample_mb={cfg.tokenizer.max_sample_mb} must be at least 0 (0: no cap)")
    if cfg.tokenizer.vocab_size < MIN_VOCAB and not cfg.tokenizer.path:
        raise PipelineError(f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} is below {MIN_VOCAB}, "
                            f"the 256 byte pieces plus special tokens")
    workers, index = cfg.shard.num_workers, cfg.shard.worker_index
    if workers < 1 or (index is not None and not 0 <= index < workers):
        raise PipelineError(f"shard.worker_index={index} must lie in [0, shard.num_workers={workers})")
    if cfg.shard.shard_size_mb <= 0 or cfg.shard.batch_mb <= 0:
        raise PipelineError("shard.shard_size_mb and shard.batch_mb must be positive")
    if cfg.launch.nproc_per_node < 0:
        raise PipelineError(f"launch.nproc_per_node={cfg.launch.nproc_per_node} must be at least 0 "
                            f"(0: one rank per GPU, else 2 CPU ranks)")
    # only for the stages asked for: a bad train.* must not block stages=[tokenize,shard]
    training = [key for key, stage in TRAINING_KEYS if stage in cfg.stages]
    for key in training:
        validate_training(cfg, key)
    if training:
        validate_optimizer(cfg.optimizer, cfg.deepspeed)
    if "eval" in cfg.stages:
        validate_eval(cfg.eval)


def built_in() -> tuple[str, ...]:
    from .data.default_corpus import SOURCES  # the built-in corpus's sources (data=default)

    return tuple(SOURCES)


SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_mixture(cfg: PipelineConfig) -> None:
    """data.sources, data.phases and data.max_repetitions: what needs no file read."""
    data = cfg.data
    if data.sources and data.paths:
        raise PipelineError("data.paths and data.sources are both set: list the files under data.sources.<name>.paths "
                            "(or drop data.sources for one corpus)")
    for name, source in data.sources.items():
        if not SOURCE_NAME.fullmatch(name):
            raise PipelineError(f"data.sources.{name}: a source name becomes a folder name: use letters, digits, "
                                f"'.', '_' or '-' (not starting with '.' or '-', at most 64)")
        if not math.isfinite(source.weight) or source.weight < 0:
            raise PipelineError(f"data.sources.{name}.weight={source.weight} must be a finite number >= 0")
        if source.shards and source.paths:
            raise PipelineError(f"data.sources.{name}: give paths or shards, not both")
        if source.shards and not cfg.tokenizer.path:
            raise PipelineError(f"data.sources.{name}.shards needs tokenizer.path=: the SentencePiece model the "
                                f"shards were written with (their ids are checked against its vocabulary)")
        if source.missing_eos not in MISSING_EOS:
            raise PipelineError(f"data.sources.{name}.missing_eos={source.missing_eos!r}: choose refuse or append")
        if not source.paths and not source.shards and (data.source != "default" or name not in built_in()):
            raise PipelineError(f"data.sources.{name} has neither paths nor shards: give "
                                f"data.sources.{name}.paths=[...] or data.sources.{name}.shards=DIR")
    if data.sources and not sum(s.weight for s in data.sources.values()) > 0:
        raise PipelineError("data.sources: every weight is 0: give at least one source a positive weight")
    if not data.max_repetitions > 0:
        raise PipelineError(f"data.max_repetitions={data.max_repetitions} must be positive")
    names = set(data.sources) or {"corpus"}
    steps = [phase.step for phase in data.phases]
    if data.phases and (steps[0] != 0 or steps != sorted(set(steps))):
        raise PipelineError(f"data.phases: steps {steps} must start at 0 and increase")
    for phase in data.phases:
        unknown = sorted(set(phase.weights) - names)
        if unknown:
            raise PipelineError(f"data.phases (step {phase.step}): weight for unknown source(s) {unknown}; the "
                                f"sources are {sorted(names)}")
        if any(not math.isfinite(w) or w < 0 for w in phase.weights.values()) or not sum(phase.weights.values()) > 0:
            raise PipelineError(f"data.phases (step {phase.step}): weights {dict(phase.weights)} must be >= 0 with "
                                f"at least one positive")


def validate_training(cfg: PipelineConfig, key: str) -> None:
    """train.* or finetune.*: values the training loop divides by, or would take without complaint and
    fail on (or ignore) hours later."""
    t: TrainConfig = getattr(cfg, key)
    micro = t.micro_batch_size
    if micro != AUTO and (isinstance(micro, bool) or not isinstance(micro, int)):
        raise PipelineError(f"{key}.micro_batch_size={micro!r}: give a whole number of sequences, or auto")
    if not 0 < t.auto_memory_fraction <= 1:
        raise PipelineError(f"{key}.auto_memory_fraction={t.auto_memory_fraction} must lie in (0, 1]")
    small = [f"{key}.{name}={getattr(t, name)}" for name in ("seq_len", "micro_batch_size", "global_batch_size",
             "max_steps", "log_interval", "eval_interval", "save_interval") if getattr(t, name) != AUTO
             and getattr(t, name) < 1]
    if small:
        raise PipelineError(f"{', '.join(small)}: must be at least 1")
    BatchLayout.check(t, key, world=1)  # the rank count is checked once it is known
    if key == "finetune" and t.document_mask:
        raise PipelineError("finetune.document_mask=true: fine-tuning isolates packed examples with "
                            "finetune.pack_isolate=true (its default); document_mask is train.document_mask")
    if t.schedule not in SCHEDULES:
        raise PipelineError(f"{key}.schedule={t.schedule!r}: choose {', '.join(SCHEDULES)}")
    if t.verify_shards not in VERIFY_MODES:
        raise PipelineError(f"{key}.verify_shards={t.verify_shards!r}: choose {', '.join(VERIFY_MODES)}")
    if t.nonfinite not in ("skip", "stop"):
        raise PipelineError(f"{key}.nonfinite={t.nonfinite!r}: choose skip or stop")
    if t.max_nonfinite_skips < 0 or t.spike_window < 2 or (t.spike_threshold or 0) < 0:
        raise PipelineError(f"{key}.max_nonfinite_skips={t.max_nonfinite_skips}, {key}.spike_window={t.spike_window}, "
                            f"{key}.spike_threshold={t.spike_threshold}: need at least 0, at least 2, and not negative")
    if key == "train" or cfg.finetune.init == "pretrain":  # an HF init brings its own architecture
        model = cfg.model
        if t.seq_len > model.max_seq_len:
            raise PipelineError(f"{key}.seq_len={t.seq_len} exceeds model.max_seq_len={model.max_seq_len} of "
                                f"model={model.name}; lower {key}.seq_len or raise model.max_seq_len")
        if min(model.dim, model.n_heads, model.n_kv_heads) < 1 or model.dim % model.n_heads \
                or model.n_heads % model.n_kv_heads or (model.dim // model.n_heads) % 2:
            raise PipelineError(f"model.dim={model.dim}, model.n_heads={model.n_heads}, model.n_kv_heads="
                                f"{model.n_kv_heads}: dim must split into n_heads heads of even size, and n_heads "
                                f"into n_kv_heads groups")


def validate_optimizer(opt: OptimizerConfig, ds: DeepSpeedConfig) -> None:
    """optimizer.*, and the DeepSpeed combination Muon does not run under (checked before ranks start)."""
    if opt.name not in OPTIMIZERS:
        raise PipelineError(f"optimizer.name={opt.name!r}: use optimizer=adamw or optimizer=muon")
    if opt.name != "muon":
        return
    if not opt.muon_lr_ratio > 0 or not 0 <= opt.momentum < 1 or (opt.muon_weight_decay or 0) < 0:
        raise PipelineError(f"optimizer.muon_lr_ratio={opt.muon_lr_ratio}, optimizer.momentum={opt.momentum}, "
                            f"optimizer.muon_weight_decay={opt.muon_weight_decay}: need > 0, in [0, 1) and not negative")
    if opt.ns_method not in NS_METHODS:
        raise PipelineError(f"optimizer.ns_method={opt.ns_method!r}: choose {', '.join(NS_METHODS)}")
    if ds.offload_optimizer or ds.offload_param:
        # DeepSpeed refuses a client optimizer under offload, and its own Muon there (the "optimizer" section)
        # splits by parameter name, which would put our output head on Muon
        raise PipelineError(f"optimizer=muon does not run with offload (deepspeed={ds.name}: offload_optimizer="
                            f"{ds.offload_optimizer}, offload_param={ds.offload_param}): use deepspeed=zero0, "
                            f"zero1, zero2 or zero3 without offload, or optimizer=adamw")


def validate_eval(ev: EvalConfig) -> None:
    """eval.*: what lm-eval would otherwise refuse after the exports are loaded, or take without a word."""
    if ev.source not in EVAL_SOURCES:
        raise PipelineError(f"eval.source={ev.source!r}: choose pretrain, finetune or all")
    batch = ev.batch_size
    if batch != AUTO and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise PipelineError(f"eval.batch_size={batch!r}: give a whole number of at least 1, or auto")
    if ev.limit is not None and not ev.limit > 0:
        raise PipelineError(f"eval.limit={ev.limit}: give a number of documents per task (or a fraction below 1), "
                            f"or null for all")
    if ev.num_fewshot is not None and ev.num_fewshot < 0:
        raise PipelineError(f"eval.num_fewshot={ev.num_fewshot} must be at least 0 (or null: each task's own)")
    if ev.dtype is not None and ev.dtype not in EVAL_DTYPES:
        raise PipelineError(f"eval.dtype={ev.dtype!r}: choose one of {list(EVAL_DTYPES)}")
    missing = [p for p in ev.include_path if not Path(p).expanduser().is_dir()]
    if missing:
        raise PipelineError(f"eval.include_path: {missing} is not a folder; give folders of lm-eval task YAML files")
