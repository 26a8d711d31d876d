"""Typed configuration: one plain dataclass per config section (and Hydra group).

Only the entry point (`pipeline.__main__`) knows Hydra: it registers these classes as the schema,
converts the composed DictConfig with `OmegaConf.to_object` and hands the dataclasses down; each
function takes the section it needs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

STAGES = ("tokenize", "shard", "pretrain", "finetune", "export", "eval")
# The values some keys accept (pipeline/validate.py checks them)
MISSING_EOS = ("refuse", "append")
SCHEDULES = ("cosine", "constant", "wsd")
VERIFY_MODES = ("full", "size", "off")
EVAL_SOURCES = ("pretrain", "finetune", "all")
EVAL_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class SourceConfig:
    """One source of a data mixture (`data.sources.<name>`): text files, or existing MMIDIDX shards."""
    paths: list[str] = field(default_factory=list)  # files, dirs or globs, as data.paths; empty with data=default: built in
    text_field: str = "text"
    split_on_blank_lines: bool = False
    weight: float = 1.0  # share of training tokens, relative to the other sources' weights
    shards: Optional[str] = None  # a folder or prefix of MMIDIDX .bin/.idx shards (needs tokenizer.path)
    missing_eos: str = "refuse"  # shards whose documents do not end with </s>: refuse | append (rewritten with it)


@dataclass
class PhaseConfig:
    """From `step` on, the mixture's weights are `weights` (sources left out: weight 0)."""
    step: int = 0
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class DataConfig:
    source: str = "default"  # "default": the built-in generated corpus; "files": data.paths
    paths: list[str] = field(default_factory=list)  # files, dirs or globs: .txt .jsonl .json .parquet
    text_field: str = "text"  # column holding the text in jsonl/json/parquet
    split_on_blank_lines: bool = False  # .txt: one document per blank-line-separated block
    val_fraction: float = 0.01  # share of documents held out for validation
    seed: int = 1234  # decides the train/val split and the default corpus
    default_num_documents: int = 10000  # size of the built-in corpus (data=default)
    # a mixture: name -> SourceConfig (README "Data mixtures"); empty with data=files: data.paths is one source.
    # Typed Any so that the command line can add a source (+data.sources.code.paths=[...]), which OmegaConf
    # refuses for a dict of dataclasses; the entry point types each one as a SourceConfig
    sources: dict[str, Any] = field(default_factory=dict)
    max_repetitions: float = 4.0  # a source planned to be seen more often than this is an error
    phases: list[PhaseConfig] = field(default_factory=list)  # weights that change at given steps


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # reuse this SentencePiece .model and skip training
    vocab_size: int = 4096
    model_type: str = "bpe"  # bpe | unigram
    input_sentence_size: int = 2_000_000  # training sample, in text chunks (SentencePiece samples)
    character_coverage: float = 0.9995  # the rest falls back to bytes
    max_sentence_bytes: int = 8192  # documents are cut into chunks of at most this many bytes
    max_sample_mb: float = 500.0  # a seeded share of the chunks, about this much text, is trained on; 0: all
    num_threads: int = 0  # 0: all cores


@dataclass
class ShardConfig:
    shard_size_mb: float = 512.0  # a new .bin/.idx pair starts once a shard reaches this size
    batch_mb: float = 4.0  # text handed to the encoder at once; bounds memory
    encode_threads: int = 0  # SentencePiece encode threads; 0: all cores
    num_workers: int = 1  # jobs that each write a disjoint part of the corpus
    worker_index: Optional[int] = None  # this job's part; unset with num_workers>1: merge the parts


@dataclass
class ModelConfig:
    """A Llama-architecture decoder; maps one to one onto HF LlamaConfig."""
    name: str = "tiny"
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    dim: int = 64  # hidden_size
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention when < n_heads
    ffn_dim: int = 176  # SwiGLU intermediate_size
    max_seq_len: int = 512  # max_position_embeddings
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02  # output projections are scaled by 1/sqrt(2 * n_layers)
    dropout: float = 0.0  # attention-probability dropout in training (HF attention_dropout)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block


@dataclass
class TrainConfig:
    seq_len: int = 256
    # per rank and forward pass; or "auto", the largest that fits. Any, not Union[int, str], which OmegaConf
    # supports only from 2.3; validate_training admits a positive int or "auto".
    micro_batch_size: Any = 8
    auto_memory_fraction: float = 0.8  # micro_batch_size=auto: share of the device's memory it may fill
    global_batch_size: int = 16  # sequences per optimizer step = micro batch × accumulation × ranks
    max_steps: int = 1500  # the default run: ~5 min on 2 CPU cores, long enough for fine-tuning to pay off
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr × this
    warmup_steps: int = 30
    schedule: str = "cosine"  # cosine | constant | wsd (warmup, stable, decay over decay_fraction)
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying
    weight_decay: float = 0.1  # not applied to norms and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8  # fixed slice of shards/val: eval_batches × micro_batch_size × ranks windows
    save_interval: int = 100
    keep_last: int = 2
    resume: str = "auto"  # auto: newest complete checkpoint of this run; none; or a checkpoint path
    verify_shards: str = "full"  # full (sha256) | size | off
    # a save blocks training only for a host copy of the state (pinned on GPU, kept for the next save);
    # a writer thread per rank writes it. false: write before training goes on, no extra host memory
    async_checkpoint: bool = True
    checkpoint_sha256: bool = True  # record every checkpoint file's sha256 (ranks hash in parallel); resume checks it
    nonfinite: str = "skip"  # non-finite loss or gradient norm: skip the update on every rank, or stop
    max_nonfinite_skips: int = 5  # consecutive skipped updates (non-finite or spike) tolerated, then stop
    spike_threshold: Optional[float] = None  # skip an update whose loss > mean + this × std of the last
    spike_window: int = 50  # ... spike_window updates; null or 0: no spike guard
    # a token attends only to earlier tokens of its own document (documents end at EOS) within a window
    document_mask: bool = False


@dataclass
class FinetuneDataConfig:
    paths: list[str] = field(default_factory=list)  # jsonl/parquet; empty: the built-in instruction set
    val_fraction: float = 0.05  # held out from data.paths (the built-in set has its own eval split)
    seed: int = 1234


@dataclass
class FinetuneConfig(TrainConfig):
    """Supervised fine-tuning on the same engine; every TrainConfig key applies, under finetune."""
    init: str = "pretrain"  # this run's pretrained weights, or a path to an HF export folder
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    pack: bool = True  # several examples per sequence; the loss is on answers only
    pack_isolate: bool = True  # a packed example attends only to itself (false: to the ones before it too)
    document_mask: bool = False  # pretraining only: fine-tuning isolates packed examples with pack_isolate
    eval_exact_match: int = 200  # held-out questions answered greedily before and after; 0: skip
    max_new_tokens: int = 16
    max_steps: int = 200
    lr: float = 3e-4  # well below pretraining's: a higher one overwrites what pretraining taught
    warmup_steps: int = 10
    eval_interval: int = 100
    save_interval: int = 200


@dataclass
class ExportConfig:
    source: str = "all"  # pretrain | finetune | all (each one whose checkpoints exist)
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16, the safetensors dtype
    max_shard_size_gb: float = 5.0  # model.safetensors above this is split, with an index


@dataclass
class EvalConfig:
    """The `eval` stage: lm-evaluation-harness on the exports, offline (pipeline/stages/eval.py)."""
    source: str = "all"  # pretrain | finetune | all (each export that exists)
    tasks: list[str] = field(default_factory=list)  # lm-eval task/group/tag names; empty: built-in ones on data=default
    include_path: list[str] = field(default_factory=list)  # folders of the user's own task YAMLs (local data)
    limit: Optional[float] = None  # documents per task (below 1: a fraction); None: all
    num_fewshot: Optional[int] = None  # None: each task's own (0 for the built-in tasks)
    batch_size: Any = 32  # a whole number, or "auto" (lm-eval finds the largest that fits)
    device: Optional[str] = None  # None: cuda when available, else cpu
    dtype: Optional[str] = None  # float32 | bfloat16 | float16 | auto (the export's); None: auto on GPU, float32 on CPU


@dataclass
class DeepSpeedConfig:
    name: str = "zero2"
    stage: int = 2
    offload_optimizer: bool = False  # optimizer state and step on the CPU (DeepSpeedCPUAdam)
    offload_param: bool = False  # ZeRO 3 only: parameters live on the CPU
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed JSON as is


OPTIMIZERS = ("adamw", "muon")
NS_METHODS = ("gram", "standard")


@dataclass
class OptimizerConfig:
    """The `optimizer` group, for pretrain and finetune alike. AdamW's own keys stay in train.* / finetune.*
    (lr, beta1, beta2, eps, weight_decay): under `muon` they configure the AdamW half (embeddings, output
    head, norms). DeepSpeed's Muon fixes Newton-Schulz at 5 steps with Nesterov momentum."""
    name: str = "adamw"  # adamw | muon (DeepSpeed's MuonWithAuxAdam: Muon on hidden matrices, AdamW on the rest)
    # Muon's peak learning rate is this × train.lr (finetune.lr in fine-tuning), on the same warmup and decay
    muon_lr_ratio: float = 5.0  # the best of 1.25-20 on the default run (bench/optimizer.py, README)
    momentum: float = 0.95  # Muon's momentum (Nesterov)
    ns_method: str = "gram"  # Newton-Schulz iteration: gram | standard
    muon_weight_decay: Optional[float] = None  # decoupled, × Muon's lr; None: train.weight_decay (finetune.*)
    # 2-D parameters kept on AdamW, by name prefix (model.named_parameters()); the other 2-D matrices go to
    # Muon, 1-D ones (norms) always to AdamW
    adamw_params: list[str] = field(default_factory=lambda: ["tok_embeddings", "output"])
    # DeepSpeed clips the norm of Muon's orthogonalised updates and AdamW's gradients together (an update's
    # norm is fixed by its shape, ~30 over the tiny model), which would shrink every step: false leaves
    # train.grad_clip out under muon; true applies it as DeepSpeed does
    muon_grad_clip: bool = False


@dataclass
class PrecisionConfig:
    name: str = "bf16"  # bf16 | fp16 | fp32
    initial_scale_power: int = 16  # fp16 dynamic loss scaling starts at 2**this
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0


@dataclass
class LaunchConfig:
    nproc_per_node: int = 0  # ranks started when not under a launcher; 0: one per GPU, else 2 CPU ranks
    master_port: int = 0  # 0: a free port
    timeout_s: int = 600  # process-group timeout for init, the first step and checkpoint saves
    step_timeout_s: int = 300  # after the first step: a dead or hung rank fails the job this soon; 0: timeout_s
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # checkpoint, exit 0
    lock_stale_s: int = 120  # a run lock held from another host whose heartbeat is older than this is taken over


@dataclass
class WandbConfig:
    mode: Optional[str] = None  # online | offline | disabled; None: online with WANDB_API_KEY, else offline
    project: str = "pipeline"
    entity: Optional[str] = None
    name: Optional[str] = None  # default: the run_dir's name
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    api_key: Optional[str] = None  # prefer WANDB_API_KEY; either way redacted wherever configs are written


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class PipelineConfig:
    run_dir: str = "runs/default"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    force: bool = False
    debug: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# The training stages and their config sections: `pretrain` is configured under `train.*`.
SECTION_OF_STAGE = {"pretrain": "train", "finetune": "finetune"}
TRAINING_KEYS = tuple((section, stage) for stage, section in SECTION_OF_STAGE.items())  # (section, stage)


def stage_of(section: str) -> str:
    """The training stage a config section configures: train -> pretrain, finetune -> finetune."""
    return next(stage for stage, key in SECTION_OF_STAGE.items() if key == section)


def optimizer_inputs(opt: OptimizerConfig) -> dict:
    """The optimizer group's share of a training stage's inputs. AdamW's settings are train.* keys, already
    in the inputs, so under adamw nothing is added: a run from before the group existed is not redone."""
    return {} if opt.name == "adamw" else {"optimizer": asdict(opt)}
