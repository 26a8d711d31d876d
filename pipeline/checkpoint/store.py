"""Crash-safe DeepSpeed checkpoints: a checkpoint counts only once its completion record exists.

DeepSpeed's own `latest` file is written by rank 0 before the other ranks finish, so it is never
used. A save goes: every rank hands its DeepSpeed shards and RNG state for `step_NNNNNNNN/` to its
writer (checkpoint_writer.py: a host copy, then temp name, sha256, fsync, rename on a background
thread) and goes back to training. After its files the writer leaves a marker listing them with
their sizes and sha256; rank 0's writer waits for every rank's marker, lists every file of the
folder with its size and sha256 into `complete.json` (temp, fsync, rename) and then moves the
`latest` pointer the same way. Resume takes the newest checkpoint whose record verifies (sizes,
and the sha256 of every file, hashed by all ranks in parallel) and says which ones it skipped and
why. Callers outside the process group (the stage runner, export) check sizes only.

DeepSpeed's resume state is pickled and trusted: only resume from checkpoint folders you wrote,
and never from one whose record does not verify. Our own files (RNG states) load with
`weights_only=True`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from pathlib import Path

from ..errors import PipelineError
from ..faults import kill_point
from ..fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, no_space, sha256_file
from ..redaction import redact_values
from .elastic import client_state, prune_orphans, universal_load

log = logging.getLogger(__name__)

RECORD = "complete.json"
POINTER = "latest"
PREFIX = "step_"


class PeerWriteFailed(PipelineError):
    """Rank 0's commit found another rank's failure marker: that rank's own error says why."""


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def rng_state() -> dict:
    import numpy as np
    import torch

    numpy_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, root: Path, step: int, trainer_state: dict, keep_last: int,
                    timeout_s: float = 600) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder, complete once the engine's
    writer (checkpoint_writer.BackgroundWriter) has run the commit queued here: at once without a
    background writer, else by the next `wait()`. `timeout_s`: how long rank 0's commit waits for the
    other ranks' files."""
    import torch.distributed as dist

    writer = engine.checkpoint_engine
    writer.wait()  # the previous save is committed on this rank (one save in flight at a time)
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = tag_for(step)
    folder = root / tag
    if rank == 0:
        if folder.exists():  # leftovers of a save that never completed
            shutil.rmtree(folder)
        folder.mkdir(parents=True)  # here, so that DeepSpeed's own makedirs write nothing
    dist.barrier()
    writer.folder, writer.rank = folder, rank  # where a failed write leaves its marker
    try:
        # DeepSpeed's files, through the writer; with what a conversion to the universal format needs (elastic.py)
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state(), save_latest=False)
    except OSError as exc:
        # Rank 0 copies DeepSpeed's recovery scripts itself, the last write of its save before the barrier that
        # ends it. A full disk there loses the save as a failed background write does: the failure joins the
        # step's agreement and every rank stops with its message (Checkpointer.check_writer), not rank 0 alone.
        full = no_space(exc, folder)
        if not full:
            raise
        writer.fail(PipelineError(f"checkpoint {folder}: writing DeepSpeed's recovery scripts: {full}"))
        dist.barrier()  # DeepSpeed's closing barrier, where the other ranks wait
    else:
        writer.save(rng_state(), str(folder / f"rng_rank{rank:05d}.pt"))
        trainer_state = redact_values(trainer_state)
        writer.submit(lambda: _commit(writer, folder, step, rank, world, trainer_state, keep_last, timeout_s))
    if not writer.background:
        dist.barrier()  # every rank returns with the checkpoint complete
    return folder


def _marker(rank: int) -> str:
    return f"written_rank{rank:05d}.json"


def _commit(writer, folder: Path, step: int, rank: int, world: int, trainer_state: dict, keep_last: int,
            timeout_s: float) -> None:
    """On the writer, after this rank's files: its marker (its files' sizes and sha256); then, on rank 0,
    once every rank's marker is there, the completion record, the `latest` pointer and the pruning."""
    written = {str(Path(path).relative_to(folder)): entry for path, entry in writer.written.items()}
    writer.written.clear()
    fsync_dir(folder)
    kill_point(step, "shards", rank)
    atomic_write_json(folder / _marker(rank), written)
    if rank != 0:
        return
    deadline = time.monotonic() + timeout_s
    while missing := [r for r in range(world) if not (folder / _marker(r)).is_file()]:
        failed = [r for r in missing if (folder / f"failed_rank{r:05d}").exists()]
        if failed:
            raise PeerWriteFailed(f"checkpoint {folder}: rank(s) {failed} failed writing their files")
        if time.monotonic() > deadline:
            raise PipelineError(f"checkpoint {folder}: rank(s) {missing} did not finish writing within "
                                f"{timeout_s:.0f} s (launch.timeout_s)")
        time.sleep(0.05)
    digests = {}
    for r in range(world):
        digests.update({name: digest for name, (_, digest) in json.loads((folder / _marker(r)).read_text()).items()})
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and p.name != RECORD and not p.name.endswith(".tmp"))
    record = {"step": step, "world_size": world, "trainer_state": trainer_state,
              "files": {name: (folder / name).stat().st_size for name in names}}
    if writer.digests:  # files no marker lists (DeepSpeed's recovery scripts, the markers) are hashed here
        record["sha256"] = {name: digests.get(name) or sha256_file(folder / name) for name in names}
    kill_point(step, "record", rank)
    atomic_write_json(folder / RECORD, record)
    kill_point(step, "pointer", rank)
    atomic_write_bytes(folder.parent / POINTER, folder.name.encode())
    writer.committed_at = time.perf_counter()
    kill_point(step, "prune", rank)
    prune(folder.parent, keep_last, current=folder)


def _process_group():
    """torch.distributed while a process group of more than one rank is up, else None. Imported here, not
    at the top: the runner checks checkpoints without torch."""
    import torch.distributed as dist

    return dist if dist.is_initialized() and dist.get_world_size() > 1 else None


def _hash_share(folder: Path, names: list[str], collective: bool = True) -> dict[str, str]:
    """sha256 of this rank's share of `names` (every world_size-th, so the ranks split the reading),
    or of all of them outside a collective."""
    dist = _process_group() if collective else None
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
    return {name: sha256_file(folder / name) for name in names[rank::world]}


def verify(folder: Path, digests: bool = False, collective: bool = False) -> tuple[dict | None, str]:
    """The completion record if every file it lists is present with its size (and, with `digests`,
    its sha256 where the record has one), else None and why not. `collective` (every rank of the
    process group calls it): the ranks split the hashing and all return the same verdict."""
    dist = _process_group() if collective else None
    collective = dist is not None
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


def find_resumable(root: Path, digests: bool = False, collective: bool = False,
                   warn: bool = True) -> tuple[Path, dict] | None:
    """The newest checkpoint under `root` whose completion record verifies; with `digests` the files'
    contents too. `collective`: every rank calls it, shares the hashing and gets the same answer. `warn`:
    name each folder passed over (the ranks do; a look ahead of them does not)."""
    dist = _process_group() if collective else None
    collective = dist is not None
    folders = [sorted(root.glob(f"{PREFIX}*"), reverse=True) if root.is_dir() else []]
    if collective:  # rank 0's view decides which folders are tried, in which order
        dist.broadcast_object_list(folders, src=0)
    for folder in folders[0]:
        record, problem = verify(folder, digests=digests, collective=collective)
        if record is not None:
            return folder, record
        if warn and (not collective or dist.get_rank() == 0):
            log.warning("checkpoint %s skipped: %s", folder, problem)
    return None


def refuse_another_optimizer(folder: Path, record: dict, optimizer: str, section: str) -> None:
    """A checkpoint's optimizer state continues only under the optimizer that wrote it."""
    saved = record.get("trainer_state", {}).get("optimizer", "adamw")  # older checkpoints: AdamW
    if saved != optimizer:
        raise PipelineError(f"checkpoint {folder} was written with optimizer={saved}, this run has "
                            f"optimizer={optimizer}: resume with optimizer={saved}, or start afresh "
                            f"({section}.resume=none or a new run_dir)")


def load_checkpoint(engine, folder: Path, restore_rng: bool = True, universal: bool = False) -> dict:
    """Collective. Restores model, optimizer and this rank's RNG state; returns the trainer state.
    The caller has verified the folder's contents (verify with digests); sizes are checked again here.
    `universal`: `folder` is a universal checkpoint (elastic.py), loaded on any world size."""
    import torch
    import torch.distributed as dist

    record, problem = verify(folder)
    if record is None:
        raise PipelineError(f"refusing to resume from {folder}: {problem}")
    with universal_load(engine) if universal else contextlib.nullcontext():  # by tag: never `latest_universal`
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
    prune_orphans(root)
    fsync_dir(root)
