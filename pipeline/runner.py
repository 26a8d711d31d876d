"""Runs the requested stages in their fixed order, skipping those that are complete and unchanged.

Each finished stage leaves `run_dir/stages/<stage>.json`: the sha256 of everything its outputs
depend on (config and inputs) and the size (and, for small files, sha256) of every output. A stage
is skipped when that record matches the current inputs and its outputs are still intact.
Under a multi-rank launcher, data stages run on rank 0 and the other ranks wait for its record;
`shard` splits the corpus between the ranks and rank 0 merges their parts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable

import yaml

from . import __version__
from .config import PipelineConfig, validate
from .control import stop_if_preempted
from .corpus import Corpus, files_fingerprint, resolve_paths
from .distributed import LaunchInfo
from .errors import PipelineError
from .fsutil import atomic_write_bytes, atomic_write_json, sha256_file
from .redaction import install_log_redaction, redact

log = logging.getLogger(__name__)

SMALL_FILE = 16 << 20  # outputs up to this size are checked by sha256 before a skip, larger by size


@dataclass
class Context:
    cfg: PipelineConfig
    run_dir: Path
    launch: LaunchInfo
    resolved: dict = field(default_factory=dict)  # the composed config as plain data

    @property
    def tokenizer_path(self) -> Path:
        return self.run_dir / "tokenizer" / "tokenizer.model"

    @cached_property
    def corpus_paths(self) -> list[Path]:
        if self.cfg.data.source == "default":
            return [self.run_dir / "data" / "default" / "corpus.jsonl"]
        return resolve_paths(self.cfg.data.paths)

    def corpus_identity(self) -> object:
        """What the corpus's content depends on, without reading it."""
        if self.cfg.data.source == "default":
            from .default_corpus import GENERATOR_VERSION

            return {"generator": GENERATOR_VERSION, "seed": self.cfg.data.seed,
                    "documents": self.cfg.data.default_num_documents}
        return files_fingerprint(self.corpus_paths)

    def open_corpus(self) -> Corpus:
        if self.cfg.data.source == "default":
            from .default_corpus import write_default_corpus

            write_default_corpus(self.corpus_paths[0].parent, seed=self.cfg.data.seed,
                                 num_documents=self.cfg.data.default_num_documents)
            data = replace(self.cfg.data, text_field="text", split_on_blank_lines=False)
            return Corpus(self.corpus_paths, data)
        return Corpus(self.corpus_paths, self.cfg.data)


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: Callable[[Context], dict]  # everything the outputs depend on
    run: Callable[[Context], list[Path]]  # does the work; returns the output files
    rank_zero_only: bool = False  # under a launcher rank 0 runs it (shard: split) and the rest wait
    distributed: bool = False  # every rank runs it together, under a launcher or local ranks we start


def file_digest(path: Path) -> str:
    return sha256_file(path) if path.is_file() else "missing"


def tokenize_inputs(ctx: Context) -> dict:
    cfg = ctx.cfg.tokenizer
    if cfg.path:
        return {"reuse_sha256": file_digest(Path(cfg.path))}
    data = {k: v for k, v in asdict(ctx.cfg.data).items() if k != "val_fraction"}
    settings = {k: v for k, v in asdict(cfg).items() if k != "num_threads"}
    return {"tokenizer": settings, "data": data, "corpus": ctx.corpus_identity()}


def run_tokenize(ctx: Context) -> list[Path]:
    from .tokenizer import reuse_tokenizer, train_tokenizer

    if ctx.cfg.tokenizer.path:
        reuse_tokenizer(Path(ctx.cfg.tokenizer.path), ctx.tokenizer_path)
    else:
        train_tokenizer(ctx.open_corpus(), ctx.cfg.tokenizer, ctx.tokenizer_path, seed=ctx.cfg.data.seed)
    return [ctx.tokenizer_path]


def shard_inputs(ctx: Context) -> dict:
    if not ctx.tokenizer_path.is_file():
        raise PipelineError(f"no tokenizer at {ctx.tokenizer_path}: run stages=[tokenize,shard] "
                            f"or set tokenizer.path= with stage tokenize")
    shard = {k: v for k, v in asdict(ctx.cfg.shard).items() if k not in ("encode_threads", "batch_mb")}
    return {"tokenizer_sha256": sha256_file(ctx.tokenizer_path), "data": asdict(ctx.cfg.data),
            "corpus": ctx.corpus_identity(), "shard": shard}


def run_shard(ctx: Context) -> list[Path]:
    from .shard import MANIFEST, shard_corpus

    manifest = shard_corpus(ctx.open_corpus(), ctx.cfg, ctx.tokenizer_path, ctx.run_dir)
    shards = ctx.run_dir / "shards"
    if ctx.cfg.shard.worker_index is not None and ctx.cfg.shard.num_workers > 1:  # a part: the merge consumes it
        return [ctx.run_dir / "shards.parts" / f"w{ctx.cfg.shard.worker_index:03d}" / "part.json"]
    files = [shards / MANIFEST]
    for split, body in manifest["splits"].items():
        for shard in body["shards"]:
            files += [shards / split / (shard["prefix"] + ".bin"), shards / split / (shard["prefix"] + ".idx")]
    return files


def pretrain_inputs(ctx: Context) -> dict:
    manifest = ctx.run_dir / "shards" / "manifest.json"
    return {"model": asdict(ctx.cfg.model), "train": asdict(ctx.cfg.train), "deepspeed": asdict(ctx.cfg.deepspeed),
            "precision": asdict(ctx.cfg.precision),
            "shards": file_digest(manifest), "tokenizer": file_digest(ctx.tokenizer_path)}


def run_pretrain(ctx: Context) -> list[Path]:
    from .checkpoint import RECORD, find_resumable
    from .pretrain import checkpoint_root, main

    main(ctx.cfg, ctx.run_dir, ctx.resolved)
    found = find_resumable(checkpoint_root(ctx.run_dir))
    return [found[0] / RECORD] if found else []


def finetune_inputs(ctx: Context) -> dict:
    from .finetune import stage_inputs

    return stage_inputs(ctx.cfg, ctx.run_dir)


def run_finetune(ctx: Context) -> list[Path]:
    from .checkpoint import RECORD, find_resumable
    from .finetune import checkpoint_root, main

    main(ctx.cfg, ctx.run_dir, ctx.resolved)
    found = find_resumable(checkpoint_root(ctx.run_dir))
    return [found[0] / RECORD] if found else []


def export_inputs(ctx: Context) -> dict:
    from .checkpoint import find_resumable

    found = {stage: find_resumable(ctx.run_dir / stage / "checkpoints") for stage in ("pretrain", "finetune")}
    return {"export": asdict(ctx.cfg.export), "tokenizer": file_digest(ctx.tokenizer_path),
            "checkpoints": {stage: hit and {"tag": hit[0].name, "files": hit[1]["files"]}
                            for stage, hit in found.items()}}


def run_export(ctx: Context) -> list[Path]:
    from .export import run_export as export

    return export(ctx.cfg, ctx.run_dir)


PIPELINE = (
    Stage("tokenize", tokenize_inputs, run_tokenize, rank_zero_only=True),
    Stage("shard", shard_inputs, run_shard, rank_zero_only=True),
    Stage("pretrain", pretrain_inputs, run_pretrain, distributed=True),
    Stage("finetune", finetune_inputs, run_finetune, distributed=True),
    Stage("export", export_inputs, run_export, rank_zero_only=True),
)


def prepare_run_dir(cfg: PipelineConfig) -> Path:
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "stages").mkdir(exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"run_dir={cfg.run_dir!r} cannot be created ({exc.strerror}); pick a writable run_dir") from exc
    if not os.access(run_dir, os.W_OK):
        raise PipelineError(f"run_dir={cfg.run_dir!r} is not writable; pick a writable run_dir")
    return run_dir


def run_pipeline(cfg: PipelineConfig, resolved: dict, overrides: list[str]) -> None:
    """Run the requested stages; `resolved` is the whole config as plain data, `overrides` the
    command line (replayed on the local ranks that distributed stages start)."""
    install_log_redaction()  # no secret value reaches the console (pipeline/redaction.py)
    validate(cfg)
    launch = LaunchInfo.from_env()
    auto_split = launch.world_size > 1 and cfg.shard.num_workers == 1 and cfg.shard.worker_index is None
    if auto_split:  # every rank encodes its own part of the corpus, on its share of the cores
        threads = cfg.shard.encode_threads or max(1, (os.cpu_count() or 1) // launch.local_world_size)
        cfg = replace(cfg, shard=replace(cfg.shard, num_workers=launch.world_size, worker_index=launch.rank,
                                         encode_threads=threads))
    ctx = Context(cfg=cfg, run_dir=prepare_run_dir(cfg), launch=launch, resolved=resolved)
    if launch.rank == 0:
        atomic_write_bytes(ctx.run_dir / "config.yaml", yaml.safe_dump(redact(resolved), sort_keys=False).encode())
    stages = [stage for stage in PIPELINE if stage.name in cfg.stages]
    while stages:
        stage = stages.pop(0)
        stop_if_preempted(stage.name)  # no stage starts after a preemption signal (pipeline/control.py)
        if stage.distributed and not launch.under_launcher:
            # this process starts local ranks for this run of distributed stages, then goes on
            from .local_launch import run_local_ranks

            group = [stage]
            while stages and stages[0].distributed:
                group.append(stages.pop(0))
            stale = [s.name for s in group if cfg.force or not stage_is_current(s, ctx)]
            if stale:
                preflight(ctx, stale)
                os.environ[PARENT_REPORTS] = "1"  # the local ranks inherit it: this process writes the report
                try:
                    run_local_ranks(cfg, overrides, stale)
                finally:
                    os.environ.pop(PARENT_REPORTS, None)
        elif stage.name == "shard" and cfg.shard.worker_index is not None and cfg.shard.num_workers > 1:
            run_shard_part(stage, ctx, merge=auto_split)
        elif stage.rank_zero_only and launch.rank != 0:
            wait_for_record(stage, ctx)
        else:
            run_stage(stage, ctx)
    if launch.under_launcher:
        from .control import shutdown

        shutdown()
    if launch.rank == 0 and not (launch.under_launcher and os.environ.get(PARENT_REPORTS)):
        from .report import report_at_end

        report_at_end(ctx.run_dir)  # charts, report.md, and where everything is; never fails the run


PARENT_REPORTS = "PIPELINE_PARENT_REPORTS"


def preflight(ctx: Context, stages: list[str]) -> None:
    """What the local ranks of `stages` would refuse anyway, checked before they start: a bad config then
    fails in a second, with one message, not after every rank has started up. The ranks check it all
    again (under an external launcher nothing runs this)."""
    from .config import TRAINING_KEYS, check_batch_layout
    from .local_launch import default_nproc

    cfg = ctx.cfg
    for key, stage in TRAINING_KEYS:
        if stage in stages:
            check_batch_layout(getattr(cfg, key), key, cfg.launch.nproc_per_node or default_nproc())
            resume = getattr(cfg, key).resume
            if resume not in ("auto", "none") and not Path(resume).expanduser().is_dir():
                raise PipelineError(f"{key}.resume={resume!r} is not a folder: give auto, none or a checkpoint "
                                    f"folder such as {ctx.run_dir / stage / 'checkpoints' / 'step_00000100'}")
    if "pretrain" in stages:
        from .data import open_split

        # manifest, tokenizer, file sizes: cheap; hashing every shard is left to the ranks
        verify = "off" if cfg.train.verify_shards == "off" else "size"
        for split in ("train", "val"):
            open_split(ctx.run_dir / "shards", split, ctx.tokenizer_path, verify, required=split == "train")
    if "finetune" in stages and (cfg.finetune.init != "pretrain" or "pretrain" not in stages):
        from .finetune import resolve_init, will_resume

        resolve_init(cfg, ctx.run_dir, need_weights=not will_resume(cfg, ctx.run_dir))


def stage_is_current(stage: Stage, ctx: Context) -> bool:
    marker = ctx.run_dir / "stages" / f"{stage.name}.json"
    if is_complete(marker, inputs_digest(stage.inputs(ctx)), ctx.run_dir):
        log.info("%s: complete and unchanged, skipped (force=true reruns it)", stage.name)
        return True
    return False


def run_stage(stage: Stage, ctx: Context, marker_name: str | None = None) -> None:
    marker = ctx.run_dir / "stages" / f"{marker_name or stage.name}.json"
    inputs = stage.inputs(ctx)
    digest = inputs_digest(inputs)
    leader = ctx.launch.rank == 0 or not stage.distributed
    if not ctx.cfg.force and is_complete(marker, digest, ctx.run_dir):
        if leader:
            log.info("%s: complete and unchanged, skipped (force=true reruns it)", stage.name)
        return
    if leader:
        marker.unlink(missing_ok=True)  # an interrupted rerun must not look complete
        log.info("%s: running", marker_name or stage.name)
    started = time.time()
    outputs = stage.run(ctx)
    if leader:
        record = {"stage": stage.name, "inputs_sha256": digest, "inputs": redact(inputs), "version": __version__,
                  "seconds": round(time.time() - started, 3), "outputs": describe_outputs(outputs, ctx.run_dir)}
        atomic_write_json(marker, record)


def run_shard_part(stage: Stage, ctx: Context, merge: bool) -> None:
    """One job's part of `shard`; with `merge` (parts split by the launcher's ranks), rank 0 then
    merges all parts and the other ranks wait for it."""
    whole = Context(cfg=replace(ctx.cfg, shard=replace(ctx.cfg.shard, worker_index=None)),
                    run_dir=ctx.run_dir, launch=ctx.launch)
    whole_marker = ctx.run_dir / "stages" / "shard.json"
    if not ctx.cfg.force and is_complete(whole_marker, inputs_digest(stage.inputs(whole)), ctx.run_dir):
        log.info("shard: complete and unchanged, skipped (force=true reruns it)")
        return
    run_stage(stage, ctx, marker_name=f"shard-part{ctx.cfg.shard.worker_index:03d}")
    if not merge:
        return
    if ctx.launch.rank != 0:
        wait_for_record(stage, whole)
        return
    for part in range(ctx.cfg.shard.num_workers):
        if part == ctx.cfg.shard.worker_index:
            continue
        part_ctx = Context(cfg=replace(ctx.cfg, shard=replace(ctx.cfg.shard, worker_index=part)),
                           run_dir=ctx.run_dir, launch=ctx.launch)
        wait_for_record(stage, part_ctx, marker_name=f"shard-part{part:03d}")
    run_stage(stage, whole)


def inputs_digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


WAIT_TIMEOUT_S = float(os.environ.get("PIPELINE_DATA_WAIT_TIMEOUT", 6 * 3600))


def wait_for_record(stage: Stage, ctx: Context, marker_name: str | None = None) -> None:
    """Poll for another rank's completion record (data stages run before any process group exists)."""
    what = marker_name or stage.name
    marker = ctx.run_dir / "stages" / f"{what}.json"
    digest = inputs_digest(stage.inputs(ctx))
    log.info("%s: waiting for the rank that runs it", what)
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            record = json.loads(marker.read_text())
            if record.get("inputs_sha256") == digest:
                return
        except (OSError, ValueError):
            pass
        time.sleep(1.0)
    raise PipelineError(f"waited {WAIT_TIMEOUT_S:.0f} s for {what} ({marker}); check the other ranks' logs")


def describe_outputs(paths: list[Path], run_dir: Path) -> dict:
    described = {}
    for path in paths:
        size = path.stat().st_size
        described[str(path.relative_to(run_dir))] = {"size": size,
                                                     "sha256": sha256_file(path) if size <= SMALL_FILE else None}
    return described


def is_complete(marker: Path, digest: str, run_dir: Path) -> bool:
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if record.get("inputs_sha256") != digest:
        log.info("%s: inputs or config changed since the last run, rerunning", record.get("stage"))
        return False
    for rel, expected in record.get("outputs", {}).items():
        path = run_dir / rel
        if not path.is_file() or path.stat().st_size != expected["size"]:
            log.info("%s: output %s is missing or changed, rerunning", record["stage"], rel)
            return False
        if expected["sha256"] and sha256_file(path) != expected["sha256"]:
            log.info("%s: output %s is changed, rerunning", record["stage"], rel)
            return False
    return True
