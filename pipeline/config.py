"""Typed configuration: one plain dataclass per config section (and Hydra group).

Only the entry point (`pipeline.__main__`) knows Hydra: it registers these classes as the schema,
converts the composed DictConfig with `OmegaConf.to_object` and hands the dataclasses down; each
function takes the section it needs.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .batching import AUTO, BatchLayout
from .errors import PipelineError
from .vocab import MIN_VOCAB

STAGES = ("tokenize", "shard", "pretrain", "finetune", "export", "eval")


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
    """The `eval` stage: lm-evaluation-harness on the exports, offline (pipeline/eval_stage.py)."""
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
    from .default_corpus import SOURCES  # the built-in corpus's sources (data=default)

    return tuple(SOURCES)


SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MISSING_EOS = ("refuse", "append")


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


# The training stages and their config sections: `pretrain` is configured under `train.*`.
SECTION_OF_STAGE = {"pretrain": "train", "finetune": "finetune"}
TRAINING_KEYS = tuple((section, stage) for stage, section in SECTION_OF_STAGE.items())  # (section, stage)


def stage_of(section: str) -> str:
    """The training stage a config section configures: train -> pretrain, finetune -> finetune."""
    return next(stage for stage, key in SECTION_OF_STAGE.items() if key == section)
SCHEDULES = ("cosine", "constant", "wsd")
VERIFY_MODES = ("full", "size", "off")


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


def optimizer_inputs(opt: OptimizerConfig) -> dict:
    """The optimizer group's share of a training stage's inputs. AdamW's settings are train.* keys, already
    in the inputs, so under adamw nothing is added: a run from before the group existed is not redone."""
    return {} if opt.name == "adamw" else {"optimizer": asdict(opt)}


EVAL_SOURCES = ("pretrain", "finetune", "all")
EVAL_DTYPES = ("float32", "bfloat16", "float16", "auto")


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
