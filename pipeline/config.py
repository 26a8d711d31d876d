"""Typed configuration: one dataclass per Hydra group, registered in a ConfigStore.

Only the entry point (`pipeline.__main__`) sees a DictConfig; it converts it with
`OmegaConf.to_object` and passes these dataclasses down.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

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
    shard_size_mb: int = 512  # a new .bin/.idx pair starts past this size
    batch_mb: int = 4  # text handed to the encoder at once; bounds memory
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


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="pipeline_schema", node=PipelineConfig)
    cs.store(group="data", name="default", node=DataConfig(source="default"))
    cs.store(group="data", name="files", node=DataConfig(source="files"))
