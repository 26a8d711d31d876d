"""Resuming on another number of data-parallel ranks: DeepSpeed's universal checkpoints, made as a pipeline step.

A ZeRO 1-3 checkpoint partitions the optimizer state (and, on ZeRO 3, the weights) by rank, so DeepSpeed loads
it only on the world size that wrote it. When `train.resume` picks one written by another world size (its
complete.json says which), rank 0 converts it once with `deepspeed.checkpoint.ds_to_universal` into
`universal_step_NNNNNNNN/` beside it: written under a `.tmp` name, given its own complete.json (sizes, sha256,
the source record's sha256), then renamed, so a killed conversion leaves nothing that loads and a second resume
reuses the finished one. The engine loads it with DeepSpeed's `checkpoint.load_universal` switched on for that
one load (with it on, untagged loads read `latest_universal`: we always load by tag), then writes native
checkpoints again. ZeRO 0 holds the full state on every rank and loads on any world size as it is.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from ..errors import PipelineError
from ..faults import kill_point
from ..fsutil import atomic_write_json, fsync_dir, sha256_file

log = logging.getLogger(__name__)

PREFIX = "universal_"
SERIAL_BELOW = 64 << 20  # checkpoint bytes under which the conversion runs without worker processes


def client_state() -> dict:
    """What ds_to_universal requires in a ZeRO 1/2 checkpoint (saved with every checkpoint: a few bytes)."""
    from deepspeed.checkpoint import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def universal_folder(source: Path) -> Path:
    return source.with_name(PREFIX + source.name)


def needs_conversion(engine, record: dict, world: int) -> bool:
    return record.get("world_size", world) != world and engine.zero_optimization_stage() > 0


def convert(source: Path, source_record: dict, source_digest: str, stage: str) -> Path:
    """Rank 0: `source` → universal_<name>/ (temp name, record with hashes, fsync, rename)."""
    from deepspeed.checkpoint import ds_to_universal

    target = universal_folder(source)
    tmp = target.with_name(target.name + ".tmp")
    for leftover in (tmp, target):  # a killed conversion's files, or a damaged one
        shutil.rmtree(leftover, ignore_errors=True)
    source_ranks = source_record.get("world_size", 1)
    args = argparse.Namespace(input_folder=str(source), output_folder=str(tmp), keep_temp_folder=False, strict=True,
                              inject_missing_state=True, **workers(source, source_ranks))
    started = time.perf_counter()
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output), _clean_workers():
            ds_to_universal.main(args)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        log.error("ds_to_universal output:\n%s", output.getvalue()[-4000:])
        raise PipelineError(f"DeepSpeed could not convert {source} to a universal checkpoint ({exc}); resume on "
                            f"{source_ranks} rank(s), the world size that wrote it") from None
    pointer = source.parent / "latest_universal"  # DeepSpeed's own pointer, at the temp name: never used
    if pointer.is_file() and pointer.read_text().strip() == tmp.name:
        pointer.unlink()
    step = source_record["step"]
    kill_point(step, "universal", 0)
    names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    for name in names:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    sizes = {name: (tmp / name).stat().st_size for name in names}
    atomic_write_json(tmp / "complete.json", {
        "step": step, "universal": True, "world_size": source_ranks, "source": source.name,
        "source_record_sha256": source_digest, "trainer_state": source_record.get("trainer_state", {}),
        "files": sizes, "sha256": {name: sha256_file(tmp / name) for name in names}})
    kill_point(step, "universal-rename", 0)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    log.info("%s: converted %s (written by %d ranks) to DeepSpeed's universal format in %.1f s: %s, %.1f MB in "
             "%d files", stage, source.name, source_ranks, time.perf_counter() - started, target,
             sum(sizes.values()) / 1e6, len(sizes))
    return target


def workers(source: Path, source_ranks: int) -> dict:
    """ds_to_universal's worker processes: the cores of this node's ranks, which wait while rank 0 converts
    (extraction: one job per source rank; merging holds whole parameters: half the cores). A small checkpoint
    converts in this process: starting workers (each imports torch and DeepSpeed) would take longer."""
    size = sum(p.stat().st_size for p in source.glob("*.pt"))
    cores = len(os.sched_getaffinity(0)) * max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    cores = min(cores, os.cpu_count() or 1)
    if size < SERIAL_BELOW:
        return {"num_extract_workers": 1, "num_merge_workers": 1}
    return {"num_extract_workers": max(1, min(cores, source_ranks)), "num_merge_workers": max(1, cores // 2)}


@contextmanager
def _clean_workers():
    """ds_to_universal's ProcessPoolExecutor from a forkserver: workers forked from a training rank (its
    OpenMP and gloo threads) hang in their first tensor op."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from deepspeed.checkpoint import ds_to_universal

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "deepspeed.checkpoint.ds_to_universal"])
    ds_to_universal.ProcessPoolExecutor = partial(ProcessPoolExecutor, mp_context=context)
    try:
        yield
    finally:
        ds_to_universal.ProcessPoolExecutor = ProcessPoolExecutor


@contextmanager
def universal_load(engine):
    """DeepSpeed's `"checkpoint": {"load_universal": true}` for one load, with two of its ZeRO 3 slips undone:
    it gives every group the first group's settings (its weight decay to the norms too) and one shared step."""
    import torch

    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    engine._config.load_universal_checkpoint = True  # read only while loading (DeepSpeed 0.19)
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = False
    for group, kept in zip(engine.optimizer.param_groups, groups):
        group.update(kept)
    # ZeRO 3's universal load hands one `step` tensor to every group's state, and torch's Adam counts it up
    # in place once per group: 2 groups, 2 steps per update (wrong bias correction from the first update)
    for state in engine.basic_optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def prune_orphans(root: Path) -> None:
    """Universal checkpoints whose source checkpoint has been pruned, and killed conversions' temp folders."""
    for folder in root.glob(f"{PREFIX}*"):
        source = root / folder.name.removeprefix(PREFIX).removesuffix(".tmp")
        if folder.name.endswith(".tmp") or not source.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
