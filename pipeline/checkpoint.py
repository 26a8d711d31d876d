"""Crash-safe DeepSpeed checkpoints: a checkpoint counts only once its completion record exists.

DeepSpeed's own `latest` file is written by rank 0 before the other ranks finish, so it is never
used. A save goes: every rank writes its DeepSpeed shards and RNG state into `step_NNNNNNNN/` and
fsyncs them; barrier; rank 0 lists every file with its size into `complete.json` (temp, fsync,
rename) and then moves the `latest` pointer the same way. Resume takes the newest checkpoint whose
record verifies and says which ones it skipped and why.

DeepSpeed's resume state is pickled and trusted: only resume from checkpoint folders you wrote.
Our own files (RNG states) load with `weights_only=True`.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .errors import PipelineError
from .fsutil import atomic_write_bytes, atomic_write_json, fsync_dir

log = logging.getLogger(__name__)

RECORD = "complete.json"
POINTER = "latest"
PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def rng_state() -> dict:
    numpy_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, root: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    rank = dist.get_rank()
    tag = tag_for(step)
    folder = root / tag
    if rank == 0 and folder.exists():  # leftovers of a save that never completed
        shutil.rmtree(folder)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    atomic_write_bytes(folder / f"rng_rank{rank:05d}.pt", buffer.getvalue())
    fsync_files(folder)
    dist.barrier()
    if rank == 0:
        files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        atomic_write_json(folder / RECORD, {"step": step, "world_size": dist.get_world_size(),
                                            "files": files, "trainer_state": trainer_state})
        atomic_write_bytes(root / POINTER, tag.encode())
        prune(root, keep_last)
    dist.barrier()
    return folder


def fsync_files(folder: Path) -> None:
    """Make the checkpoint's files durable before rank 0 vouches for them (other ranks may still be
    renaming their own files: a file that vanished under us is theirs to sync)."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.endswith(".tmp"):
            try:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            except FileNotFoundError:
                pass


def verify(folder: Path) -> tuple[dict | None, str]:
    """The completion record if every file it lists is present with its size, else why not."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except FileNotFoundError:
        return None, "no completion record (the save did not finish)"
    except (OSError, ValueError) as exc:
        return None, f"unreadable completion record ({exc})"
    for name, size in record["files"].items():
        path = folder / name
        if not path.is_file():
            return None, f"{name} is missing"
        if path.stat().st_size != size:
            return None, f"{name} has {path.stat().st_size} bytes, the record says {size}"
    return record, ""


def find_resumable(root: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint under `root` whose completion record verifies."""
    if not root.is_dir():
        return None
    for folder in sorted(root.glob(f"{PREFIX}*"), reverse=True):
        record, problem = verify(folder)
        if record is not None:
            return folder, record
        log.warning("checkpoint %s skipped: %s", folder, problem)
    return None


def load_checkpoint(engine, folder: Path, restore_rng: bool = True) -> dict:
    """Collective. Restores model, optimizer and this rank's RNG state; returns the trainer state."""
    record, problem = verify(folder)
    if record is None:
        raise PipelineError(f"refusing to resume from {folder}: {problem}")
    load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=False, load_module_strict=True)
    if load_path is None:
        raise PipelineError(f"DeepSpeed could not load {folder}; resume from another one with train.resume=PATH")
    rng_path = folder / f"rng_rank{dist.get_rank():05d}.pt"
    same_ranks = record["world_size"] == dist.get_world_size() and rng_path.is_file()
    if restore_rng and same_ranks:
        set_rng_state(torch.load(rng_path, weights_only=True))
    elif restore_rng:
        log.warning("resuming %s with %d ranks (saved with %d): RNG streams are not restored",
                    folder, dist.get_world_size(), record["world_size"])
    return record["trainer_state"]


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (never the newest complete one)."""
    complete = [f for f in sorted(root.glob(f"{PREFIX}*")) if verify(f)[0] is not None]
    for folder in complete[:-max(1, keep_last)]:
        shutil.rmtree(folder, ignore_errors=True)
    fsync_dir(root)
