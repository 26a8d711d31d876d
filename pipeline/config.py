"""Typed configuration: one dataclass per Hydra group, registered in a ConfigStore.

Only the entry point (`pipeline.__main__`) sees a DictConfig; it converts it with
`OmegaConf.to_object` and passes these dataclasses down.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from .errors import PipelineError

STAGES = ("tokenize", "shard", "pretrain", "finetune", "export")


@dataclass
class DataConfig:
    source: str = "default"  # "default": the built-in generated corpus; "files": data.paths
    paths: list[str] = field(default_factory=list)  # files, dirs or globs: .txt .jsonl .json .parquet
    text_field: str = "text"  # column holding the text in jsonl/json/parquet
    split_on_blank_lines: bool = False  # .txt: one document per blank-line-separated block
    val_fraction: float = 0.01  # share of documents held out for validation
    seed: int = 1234  # decides the train/val split and the default corpus
    default_num_documents: int = 10000  # size of the built-in corpus (data=default)


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # reuse this SentencePiece .model and skip training
    vocab_size: int = 4096
    model_type: str = "bpe"  # bpe | unigram
    input_sentence_size: int = 2_000_000  # training sample, in text chunks (SentencePiece samples)
    character_coverage: float = 0.9995  # the rest falls back to bytes
    max_sentence_bytes: int = 8192  # documents are cut into chunks of at most this many bytes
    num_threads: int = 0  # 0: all cores


@dataclass
class ShardConfig:
    shard_size_mb: float = 512.0  # a new .bin/.idx pair starts once a shard reaches this size
    batch_mb: float = 4.0  # text handed to the encoder at once; bounds memory
    encode_threads: int = 0  # SentencePiece encode threads; 0: all cores
    num_workers: int = 1  # jobs that each write a disjoint part of the corpus
    worker_index: Optional[int] = None  # this job's part; unset with num_workers>1: merge the parts


@dataclass
class PipelineConfig:
    run_dir: str = "runs/default"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    force: bool = False
    debug: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)


MIN_VOCAB = 256 + 4 + 2  # byte-fallback pieces, unk/bos/eos/pad, the two chat tokens


def validate(cfg: PipelineConfig) -> None:
    """Checks that need no data, run before any stage does work."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown} in stages=; choose from {list(STAGES)}")
    if cfg.data.source not in ("default", "files"):
        raise PipelineError(f"data.source={cfg.data.source!r}: use data=default or data=files")
    if not 0 <= cfg.data.val_fraction < 1:
        raise PipelineError(f"data.val_fraction={cfg.data.val_fraction} must lie in [0, 1)")
    if cfg.tokenizer.model_type not in ("bpe", "unigram"):
        raise PipelineError(f"tokenizer.model_type={cfg.tokenizer.model_type!r}: choose bpe or unigram")
    if cfg.tokenizer.vocab_size < MIN_VOCAB and not cfg.tokenizer.path:
        raise PipelineError(f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} is below {MIN_VOCAB}, "
                            f"the 256 byte pieces plus special tokens")
    workers, index = cfg.shard.num_workers, cfg.shard.worker_index
    if workers < 1 or (index is not None and not 0 <= index < workers):
        raise PipelineError(f"shard.worker_index={index} must lie in [0, shard.num_workers={workers})")
    if cfg.shard.shard_size_mb <= 0 or cfg.shard.batch_mb <= 0:
        raise PipelineError("shard.shard_size_mb and shard.batch_mb must be positive")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="pipeline_schema", node=PipelineConfig)
    cs.store(group="data", name="default", node=DataConfig(source="default"))
    cs.store(group="data", name="files", node=DataConfig(source="files"))
