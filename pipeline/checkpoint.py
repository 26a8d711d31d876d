"""Crash-safe DeepSpeed checkpoints: a checkpoint counts only once its completion record exists.

DeepSpeed's own `latest` file is written by rank 0 before the other ranks finish, so it is never
used. A save goes: every rank writes its DeepSpeed shards and RNG state into `step_NNNNNNNN/` and
fsyncs them; barrier; the ranks hash the files in parallel (each its share); rank 0 lists every
file with its size and sha256 into `complete.json` (temp, fsync, rename) and then moves the
`latest` pointer the same way. Resume takes the newest checkpoint whose record verifies (sizes,
and the sha256 of every file, hashed by all ranks in parallel) and says which ones it skipped and
why. Callers outside the process group (the stage runner, export) check sizes only.

DeepSpeed's resume state is pickled and trusted: only resume from checkpoint folders you wrote,
and never from one whose record does not verify. Our own files (RNG states) load with
`weights_only=True`.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .errors import PipelineError
from .fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, sha256_file
from .redaction import redact_values

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


def _kill_point(step: int, point: str) -> None:
    """Test hook, PIPELINE_TEST_KILL_IN_SAVE=STEP:POINT[:RANK] (rank 0 by default): this rank SIGKILLs
    itself at that point of the save of STEP, as a node failure would. Points, in order: `shards`
    (its DeepSpeed shards written, before the barrier), `record` (every shard durable, before
    complete.json), `pointer` (after complete.json, before `latest`), `prune` (before pruning)."""
    spec = os.environ.get("PIPELINE_TEST_KILL_IN_SAVE")
    if not spec:
        return
    at_step, at_point, *at_rank = spec.split(":")
    if int(at_step) == step and at_point == point and dist.get_rank() == int(at_rank[0] if at_rank else 0):
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(engine, root: Path, step: int, trainer_state: dict, keep_last: int,
                    digests: bool = True) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder. `digests`: record the sha256
    of every file (the ranks hash in parallel), besides the sizes that are always recorded."""
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
    _kill_point(step, "shards")
    dist.barrier()
    # rank 0's listing is the record's: every rank hashes its share of exactly those files
    names = [sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())]
    dist.broadcast_object_list(names, src=0)
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, _hash_share(folder, names[0]) if digests else {})
    if rank == 0:
        record = {"step": step, "world_size": dist.get_world_size(), "trainer_state": redact_values(trainer_state),
                  "files": {name: (folder / name).stat().st_size for name in names[0]}}
        if digests:
            record["sha256"] = {name: digest for share in shares for name, digest in share.items()}
        _kill_point(step, "record")
        atomic_write_json(folder / RECORD, record)
        _kill_point(step, "pointer")
        atomic_write_bytes(root / POINTER, tag.encode())
        _kill_point(step, "prune")
        prune(root, keep_last, current=folder)
    dist.barrier()
    return folder


def _hash_share(folder: Path, names: list[str], collective: bool = True) -> dict[str, str]:
    """sha256 of this rank's share of `names` (every world_size-th, so the ranks split the reading),
    or of all of them outside a collective."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if collective and dist.is_initialized() else (0, 1)
    return {name: sha256_file(folder / name) for name in names[rank::world]}


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


def verify(folder: Path, digests: bool = False, collective: bool = False) -> tuple[dict | None, str]:
    """The completion record if every file it lists is present with its size (and, with `digests`,
    its sha256 where the record has one), else None and why not. `collective` (every rank of the
    process group calls it): the ranks split the hashing and all return the same verdict."""
    collective = collective and dist.is_initialized() and dist.get_world_size() > 1
    record, problem = _read_record(folder)
    if record is not None:
        problem = _check_files(folder, record, digests, collective)
    if collective:
        problems: list = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), "")
    return (record, "") if record is not None and not problem else (None, problem)


def _read_record(folder: Path) -> tuple[dict | None, str]:
    try:
        record = json.loads((folder / RECORD).read_text())
    except FileNotFoundError:
        return None, "no completion record (the save did not finish)"
    except (OSError, ValueError) as exc:
        return None, f"unreadable completion record ({exc})"
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict) or "step" not in record:
        return None, "malformed completion record"
    return record, ""


def _check_files(folder: Path, record: dict, digests: bool, collective: bool) -> str:
    for name, size in record["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the record says {size}"
    if digests:
        expected = record.get("sha256", {})
        for name, digest in _hash_share(folder, sorted(expected), collective).items():
            if digest != expected[name]:
                return f"{name} is corrupted (its sha256 differs from the record's)"
    return ""


def find_resumable(root: Path, digests: bool = False, collective: bool = False) -> tuple[Path, dict] | None:
    """The newest checkpoint under `root` whose completion record verifies; with `digests` the files'
    contents too. `collective`: every rank calls it, shares the hashing and gets the same answer."""
    collective = collective and dist.is_initialized() and dist.get_world_size() > 1
    folders = [sorted(root.glob(f"{PREFIX}*"), reverse=True) if root.is_dir() else []]
    if collective:  # rank 0's view decides which folders are tried, in which order
        dist.broadcast_object_list(folders, src=0)
    for folder in folders[0]:
        record, problem = verify(folder, digests=digests, collective=collective)
        if record is not None:
            return folder, record
        if not collective or dist.get_rank() == 0:
            log.warning("checkpoint %s skipped: %s", folder, problem)
    return None


def load_checkpoint(engine, folder: Path, restore_rng: bool = True) -> dict:
    """Collective. Restores model, optimizer and this rank's RNG state; returns the trainer state.
    The caller has verified the folder's contents (verify with digests); sizes are checked again here."""
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


def prune(root: Path, keep_last: int, current: Path | None = None) -> None:
    """Delete complete checkpoints beyond the newest `keep_last` (at least one). `current`, the one
    just written and hashed, is always kept: after a resume from an older folder it need not be the
    newest by step, and it is the one checkpoint known good. Folders older than `current` that do not
    verify are crash leftovers (a save or a prune cut short) and go too; newer ones are left alone."""
    folders = sorted(root.glob(f"{PREFIX}*"))
    complete = [f for f in folders if verify(f)[0] is not None]
    doomed = set(complete[:-max(1, keep_last)])
    if current is not None:
        doomed |= {f for f in folders if f.name < current.name and f not in complete}
        doomed.discard(current)
    for folder in sorted(doomed):
        shutil.rmtree(folder, ignore_errors=True)
    fsync_dir(root)
