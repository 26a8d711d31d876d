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
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import yaml

from . import __version__
from .checkpoint.store import find_resumable, refuse_another_optimizer, verify
from .cluster.control import stop_if_preempted
from .cluster.distributed import LaunchInfo
from .config import TRAINING_KEYS, PipelineConfig
from .data.batching import BatchLayout
from .errors import PipelineError
from .fsutil import atomic_write_bytes, atomic_write_json, sha256_file
from .layout import RunLayout
from .redaction import install_log_redaction, redact
from .stages import eval as eval_stage
from .stages import export, finetune, pretrain, shard, tokenize
from .stages.context import Context
from .validate import validate

log = logging.getLogger(__name__)

SMALL_FILE = 16 << 20  # outputs up to this size are checked by sha256 before a skip, larger by size


@dataclass(frozen=True)
class Stage:
    """A stage module's face: `inputs(ctx)` (everything its outputs depend on), `run(ctx)` (does the work,
    returns the output files) and, for distributed stages, `preflight(ctx, ...)`."""
    name: str
    module: ModuleType
    rank_zero_only: bool = False  # under a launcher rank 0 runs it (shard: split) and the rest wait
    distributed: bool = False  # every rank runs it together, under a launcher or local ranks we start

    def inputs(self, ctx: Context) -> dict:
        return self.module.inputs(ctx)

    def run(self, ctx: Context) -> list[Path]:
        return self.module.run(ctx)


PIPELINE = (
    Stage("tokenize", tokenize, rank_zero_only=True),
    Stage("shard", shard, rank_zero_only=True),
    Stage("pretrain", pretrain, distributed=True),
    Stage("finetune", finetune, distributed=True),
    Stage("export", export, rank_zero_only=True),
    Stage("eval", eval_stage, rank_zero_only=True),
)


def prepare_run_dir(cfg: PipelineConfig) -> Path:
    layout = RunLayout.of(cfg.run_dir)
    run_dir = layout.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        layout.records.mkdir(exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"run_dir={cfg.run_dir!r} cannot be created ({exc.strerror}); pick a writable run_dir") from exc
    if not os.access(run_dir, os.W_OK):
        raise PipelineError(f"run_dir={cfg.run_dir!r} is not writable; pick a writable run_dir")
    return run_dir


def run_pipeline(cfg: PipelineConfig, resolved: dict, overrides: list[str]) -> None:
    """Run the requested stages; `resolved` is the whole config as plain data, `overrides` the
    command line (replayed on the local ranks that distributed stages start). One job at a time per
    run_dir (pipeline/cluster/runlock.py); a shard part locks only its part."""
    from .cluster.runlock import RUN_LOCK_ENV, run_lock

    install_log_redaction()  # no secret value reaches the console (pipeline/redaction.py)
    validate(cfg)
    launch = LaunchInfo.from_env()
    part = cfg.shard.worker_index if cfg.shard.num_workers > 1 and cfg.stages == ["shard"] else None
    prepare_run_dir(cfg)
    with run_lock(RunLayout.of(cfg.run_dir), cfg.launch.lock_stale_s, part=part,
                  leader=launch.rank == 0 and RUN_LOCK_ENV not in os.environ):
        _run_stages(cfg, resolved, overrides, launch)


def _run_stages(cfg: PipelineConfig, resolved: dict, overrides: list[str], launch: LaunchInfo) -> None:
    auto_split = launch.world_size > 1 and cfg.shard.num_workers == 1 and cfg.shard.worker_index is None
    if auto_split:  # every rank encodes its own part of the corpus, on its share of the cores
        threads = cfg.shard.encode_threads or max(1, (os.cpu_count() or 1) // launch.local_world_size)
        cfg = replace(cfg, shard=replace(cfg.shard, num_workers=launch.world_size, worker_index=launch.rank,
                                         encode_threads=threads))
    ctx = Context(cfg=cfg, run_dir=prepare_run_dir(cfg), launch=launch, resolved=resolved)
    if launch.rank == 0:
        atomic_write_bytes(ctx.layout.config, yaml.safe_dump(redact(resolved), sort_keys=False).encode())
    stages = [stage for stage in PIPELINE if stage.name in cfg.stages]
    while stages:
        stage = stages.pop(0)
        stop_if_preempted(stage.name)  # no stage starts after a preemption signal (pipeline/cluster/control.py)
        if stage.distributed and not launch.under_launcher:
            # this process starts local ranks for this run of distributed stages, then goes on
            from .cluster.local_launch import run_local_ranks

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
        from .cluster.control import shutdown

        shutdown()
    if launch.rank == 0 and not (launch.under_launcher and os.environ.get(PARENT_REPORTS)):
        from .observe.report import report_at_end

        report_at_end(ctx.run_dir)  # charts, report.md, and where everything is; never fails the run


PARENT_REPORTS = "PIPELINE_PARENT_REPORTS"


def preflight(ctx: Context, stages: list[str]) -> None:
    """What the local ranks of `stages` would refuse anyway, checked before they start: a bad config then
    fails in a second, with one message, not after every rank has started up. The ranks check it all
    again (under an external launcher nothing runs this)."""
    from .cluster.local_launch import default_nproc

    cfg = ctx.cfg
    for key, stage in TRAINING_KEYS:
        if stage in stages:
            BatchLayout.check(getattr(cfg, key), key, cfg.launch.nproc_per_node or default_nproc())
            resume = getattr(cfg, key).resume
            if resume not in ("auto", "none") and not Path(resume).expanduser().is_dir():
                raise PipelineError(f"{key}.resume={resume!r} is not a folder: give auto, none or a checkpoint "
                                    f"folder such as {ctx.layout.checkpoints(stage) / 'step_00000100'}")
            _check_resume_optimizer(ctx, key, stage, resume)
    if "pretrain" in stages:
        pretrain.preflight(ctx)
    if "finetune" in stages:
        finetune.preflight(ctx, pretrain_runs_first="pretrain" in stages)


def _check_resume_optimizer(ctx: Context, section: str, stage: str, resume: str) -> None:
    """The checkpoint the ranks would resume from (by its record and file sizes; the ranks check every sha256)
    must have been written with this run's optimizer."""
    if resume == "none":
        return
    if resume == "auto":
        found = find_resumable(ctx.layout.checkpoints(stage), warn=False)
    else:
        folder = Path(resume).expanduser().resolve()
        found = (folder, verify(folder)[0])
    if found is not None and found[1] is not None:
        refuse_another_optimizer(*found, ctx.cfg.optimizer.name, section)


def stage_is_current(stage: Stage, ctx: Context) -> bool:
    marker = ctx.layout.stage_record(stage.name)
    if is_complete(marker, inputs_digest(stage.inputs(ctx)), ctx.run_dir):
        log.info("%s: complete and unchanged, skipped (force=true reruns it)", stage.name)
        return True
    return False


def run_stage(stage: Stage, ctx: Context, marker_name: str | None = None) -> None:
    marker = ctx.layout.stage_record(marker_name or stage.name)
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
    whole = ctx.with_cfg(replace(ctx.cfg, shard=replace(ctx.cfg.shard, worker_index=None)))
    whole_marker = ctx.layout.stage_record("shard")
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
        part_ctx = ctx.with_cfg(replace(ctx.cfg, shard=replace(ctx.cfg.shard, worker_index=part)))
        wait_for_record(stage, part_ctx, marker_name=f"shard-part{part:03d}")
    run_stage(stage, whole)


def inputs_digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


WAIT_TIMEOUT_S = float(os.environ.get("PIPELINE_DATA_WAIT_TIMEOUT", 6 * 3600))


def wait_for_record(stage: Stage, ctx: Context, marker_name: str | None = None) -> None:
    """Poll for another rank's completion record (data stages run before any process group exists)."""
    what = marker_name or stage.name
    marker = ctx.layout.stage_record(what)
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
