"""Checkpoint files written in the background: a save blocks training only for a host copy of the state.

DeepSpeed hands every file of a save to its checkpoint engine's `save(state_dict, path)`. This
engine copies the state's tensors into host buffers kept for the next save (pinned on a GPU, so the
copy runs at full transfer speed) and returns; one writer thread per rank then writes
each file under a temp name, hashes it, fsyncs it and renames it. Jobs run in submission order, so
the commit that checkpoint.py queues after a save's files runs once they are all durable. One save
is in flight at a time: `wait()` (the next save, the end of training, a preemption) blocks until the
queue is empty and raises the first failure as one clear error.

A failed write (a full disk: ENOSPC) removes this rank's files of that save and leaves a
`failed_rankNNNNN` marker in its folder, so that rank 0's commit stops waiting for this rank at once;
the trainer (checkpointing.Checkpointer.check_writer) then stops every rank with that one message.

With `background=False` every job runs at once in the caller and nothing is copied (no extra host
memory, for states that already fill it, such as ZeRO offload).
"""
from __future__ import annotations

import copy
import itertools
import logging
import os
import queue
import threading
import traceback
from pathlib import Path
from typing import Callable

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from ..errors import PipelineError
from ..fsutil import disk_full, no_space, sha256_file, space_message

log = logging.getLogger(__name__)


class BackgroundWriter(CheckpointEngine):
    def __init__(self, background: bool = True, digests: bool = True):
        super().__init__(None)
        self.name = "pipeline.BackgroundWriter"
        self.background, self.digests = background, digests
        self.written: dict[str, tuple[int, str | None]] = {}  # path -> (size, sha256) since the last commit
        self.committed_at: float | None = None  # rank 0: perf_counter() when it last wrote a complete.json
        self._jobs: queue.Queue = queue.Queue()
        self._failure: str | None = None
        self._failure_primary = False  # False: this rank only saw another rank's failure marker
        self.folder: Path | None = None  # the folder of the save in flight (checkpoint.save_checkpoint sets it)
        self.rank = 0
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}  # host copies, reused save after save
        self._thread: threading.Thread | None = None

    # -- DeepSpeed's checkpoint-engine interface --------------------------------------------------
    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        if not self.background:  # a failure is kept for the trainer's collective check, as in the background
            return self._run(lambda: self._write(state_dict, Path(path)))
        snapshot = self.host_copy(state_dict, Path(path).name)
        self.submit(lambda: self._write(snapshot, Path(path)))

    def load(self, path: str, map_location=None):
        # DeepSpeed's own files are pickles of its state: only folders whose record verified get here.
        # mmap: DeepSpeed copies the tensors into place straight from the page cache (350m on CPU: 7.4 s → 0.4 s)
        return torch.load(path, map_location=map_location, weights_only=False, mmap=True)

    def commit(self, info) -> bool:
        return True  # checkpoint.save_checkpoint queues the real commit after its own files

    # -- the queue ----------------------------------------------------------------------------------
    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` after every job before it (at once without a background thread)."""
        if not self.background:
            return self._run(job)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def idle(self) -> bool:
        """No job queued or running."""
        return self._jobs.unfinished_tasks == 0

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def wait(self) -> None:
        """Block until every submitted job has run; raise if one failed (the rest are dropped)."""
        failure = self.take_failure()
        if failure:
            raise PipelineError(failure[0])

    def take_failure(self) -> tuple[str, bool] | None:
        """Block until every submitted job has run; the failure of the lost save, if any (message, and
        whether this rank's own write failed), cleared for the next save."""
        if self._thread is not None:
            self._jobs.join()
        if self._failure is None:
            return None
        failure, self._failure = (self._failure, self._failure_primary), None
        return failure

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                self._run(job)
            finally:
                self._jobs.task_done()

    def _run(self, job: Callable[[], None]) -> None:
        if self._failure is not None:  # after a failure the save is lost: skip its remaining jobs
            return
        try:
            job()
        except Exception as exc:  # reported on the training thread (Checkpointer.check_writer)
            self.fail(exc)

    def fail(self, exc: Exception) -> None:
        """The save in flight is lost (on this thread or the writer's): its files go, the trainer's next check stops
        every rank (a PipelineError's message is kept as it is)."""
        from .store import PeerWriteFailed

        where = self.folder or Path(".")
        full = None if isinstance(exc, PipelineError) else no_space(exc, where)
        self._failure = str(exc) if isinstance(exc, PipelineError) else \
            f"checkpoint {where}: {full}" if full else f"writing a checkpoint failed: {type(exc).__name__}: {exc}"
        self._failure_primary = not isinstance(exc, PeerWriteFailed)
        log.error("checkpoint writer: %s", self._failure)
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._jobs.join()  # the job under way ends first (the others are skipped now)
        for path in list(self.written):  # the lost save's files: free their space, keep them out of the next marker
            Path(path).unlink(missing_ok=True)
        self.written.clear()
        if self._failure_primary and self.folder is not None:
            leave_failure_marker(self.folder, self.rank)

    # -- one file -----------------------------------------------------------------------------------
    def _write(self, state, path: Path) -> None:
        self.written[str(path)] = write_file(state, path, self.digests)

    def host_copy(self, state, name: str):
        """A copy of `state` that later training cannot change: tensors copied to host memory (the same
        view of one storage met twice is copied once, so tied weights stay tied), containers rebuilt, other values
        deep-copied (an optimizer's param_groups are live dicts whose lr changes every step)."""
        copies: dict[tuple, torch.Tensor] = {}
        slots = itertools.count()
        on_gpu = False

        def walk(value):
            nonlocal on_gpu
            if isinstance(value, torch.Tensor):
                # state_dict() detaches each entry anew: tied weights are two tensors on one storage
                key = (value.device, value.dtype, value.untyped_storage().data_ptr(), value.storage_offset(),
                       tuple(value.shape), value.stride())
                if key not in copies:
                    on_gpu |= value.device.type == "cuda"
                    copies[key] = self._host_tensor(value.detach(), (name, next(slots)))
                return copies[key]
            if isinstance(value, dict):
                rebuilt = copy.copy(value)  # keeps the dict's type (OrderedDict, ...)
                for key, item in value.items():
                    rebuilt[key] = walk(item)
                return rebuilt
            if isinstance(value, list):
                return [walk(item) for item in value]
            if isinstance(value, tuple):
                items = [walk(item) for item in value]
                return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
            return copy.deepcopy(value)

        snapshot = walk(state)
        if on_gpu:
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return snapshot

    def _host_tensor(self, tensor: torch.Tensor, slot: tuple[str, int]) -> torch.Tensor:
        # Buffers are kept for the next save: fresh pages cost a fault each (a 350m state copied into
        # new memory took 4.8 s on CPU), fresh pinned memory costs more still.
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.device.type == "cuda")
            self._buffers[slot] = buffer
        return buffer.copy_(tensor, non_blocking=True)


def write_file(state, path: Path, digests: bool) -> tuple[int, str | None]:
    """torch.save under a temp name, sha256 (with `digests`), fsync, rename: (size, sha256). A failed write
    leaves no temp file and, on a full disk, says so (torch.save's own error does not)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        digest = sha256_file(tmp) if digests else None  # from the page cache, right after writing
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException as exc:
        needed = state_bytes(state)
        full = isinstance(exc, Exception) and disk_full(exc, path.parent, needed)  # before the cleanup
        _close_frames(exc)
        tmp.unlink(missing_ok=True)
        if full:
            raise PipelineError(f"checkpoint {path.parent}: writing {path.name}: "
                                f"{space_message(path.parent, needed)}") from exc
        raise
    os.replace(tmp, path)
    return path.stat().st_size, digest


def leave_failure_marker(folder: Path, rank: int) -> None:
    """`failed_rankNNNNN`: rank 0's commit stops waiting for this rank's files (an empty file: it needs no
    data blocks on a full disk)."""
    try:
        os.close(os.open(folder / f"failed_rank{rank:05d}", os.O_CREAT | os.O_WRONLY))
    except OSError:
        pass  # rank 0's commit then waits launch.timeout_s for this rank


def state_bytes(state) -> int:
    """The bytes of a state's tensors: about what torch.save writes for it."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def _close_frames(exc: BaseException | None) -> None:
    """Drop the locals of the frames an exception chain holds: torch.save's hold the temp file open, whose
    space an unlink then would not free."""
    while exc is not None:
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__context__
