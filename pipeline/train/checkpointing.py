"""The trainer's checkpoint part: which checkpoint to resume from, saves in the background, their metrics.

Saves go through `checkpoint.save_checkpoint` (a host copy, then the engine's background writer); one is
in flight at a time. Each finished save leaves a metrics record: how long it held up training and how
long until its complete.json was written.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from ..checkpoint import elastic
from ..checkpoint.store import RECORD, find_resumable, load_checkpoint, save_checkpoint, verify
from ..cluster import control
from ..errors import PipelineError
from ..fsutil import no_space, sha256_file
from ..observe.metrics import MetricsLogger

log = logging.getLogger(__name__)

# switches that change how the model runs, not its weights: they may differ across a resume
RUNTIME_ONLY = {"name", "compile", "activation_checkpointing", "dropout"}


class Checkpointer:
    def __init__(self, engine, root: Path, resume: str, keep_last: int, metrics: MetricsLogger, stage: str,
                 section: str):
        self.engine, self.root, self.resume_choice, self.keep_last = engine, root, resume, keep_last
        self.metrics, self.stage, self.section = metrics, stage, section
        self._in_flight: tuple[int, float, float] | None = None  # (step, start, seconds it blocked)

    # -- resume -----------------------------------------------------------------------------------
    def find(self) -> tuple[Path, dict] | None:
        """The checkpoint {section}.resume names: auto (newest complete one of this run), none, or a folder."""
        choice = self.resume_choice
        if choice == "none":
            self._set_aside_old_checkpoints()
            return None
        if choice == "auto":  # sizes and sha256 of every file, hashed by all ranks together
            return find_resumable(self.root, digests=True, collective=True)
        folder = Path(choice).expanduser().resolve()
        if not folder.is_dir():
            raise PipelineError(f"{self.section}.resume={choice!r} is not a checkpoint folder")
        record, problem = verify(folder, digests=True, collective=True)
        if record is None:  # DeepSpeed's files are pickles: never load what the record does not vouch for
            raise PipelineError(f"refusing to resume from {folder}: {problem}; give another checkpoint folder, "
                                f"or {self.section}.resume=auto for the newest one that verifies")
        return folder, record

    def load(self, folder: Path, record: dict, model_config: dict, restore_rng: bool = True) -> dict:
        """Restore the engine from `folder`; returns the trainer state its record holds."""
        saved_model = record.get("trainer_state", {}).get("model") or {}
        changed = sorted(k for k in saved_model if k not in RUNTIME_ONLY and saved_model[k] != model_config.get(k))
        if changed:
            raise PipelineError(f"checkpoint {folder} was written for another model (differs in {changed}); "
                                f"use a new run_dir or {self.section}.resume=none")
        world = dist.get_world_size()
        if not elastic.needs_conversion(self.engine, record, world):  # ZeRO 0: the full state on every rank, any world
            return load_checkpoint(self.engine, folder, restore_rng=restore_rng)
        if dist.get_rank() == 0:
            log.info("%s: %s was written by %d ranks, this run has %d: resuming through DeepSpeed's universal "
                     "checkpoint format", self.stage, folder, record["world_size"], world)
        started = time.perf_counter()
        universal = universal_checkpoint(folder, record, self.stage)
        state = load_checkpoint(self.engine, universal, restore_rng=restore_rng, universal=True)
        if dist.get_rank() == 0:
            log.info("%s: loaded %s on %d ranks in %.1f s (conversion included); new checkpoints are native "
                     "again", self.stage, universal, world, time.perf_counter() - started)
        return state

    def _set_aside_old_checkpoints(self) -> None:
        """A fresh start must not share a folder with an older run's checkpoints (resume=auto would
        later pick whichever has the higher step): they move to checkpoints.old-N, nothing is lost."""
        root = self.root
        if dist.get_rank() == 0 and root.is_dir() and any(root.iterdir()):
            number = 1
            while root.with_name(f"{root.name}.old-{number}").exists():
                number += 1
            root.rename(root.with_name(f"{root.name}.old-{number}"))
            log.info("%s: %s.resume=none: earlier checkpoints moved to %s.old-%d", self.stage, self.section, root,
                     number)
        dist.barrier()

    # -- saves ------------------------------------------------------------------------------------
    def save(self, step: int, trainer_state: dict) -> Path:
        """Start a save; training goes on while the writer finishes it (finish)."""
        self.check_writer()
        self.wait()
        started = time.perf_counter()
        with control.long_timeout():  # writing to slow storage may outlast launch.step_timeout_s
            try:
                folder = save_checkpoint(self.engine, self.root, step, trainer_state, self.keep_last,
                                         timeout_s=control.long_timeout_s())
            except OSError as exc:  # rank 0 creating the save's folder (checkpoint.save_checkpoint)
                full = no_space(exc, self.root)
                if not full:
                    raise
                raise PipelineError(f"{self.stage}: checkpoint of step {step}: {full}; {self.last_good()}: free "
                                    f"space there, then rerun the same command to resume from it") from exc
        self._in_flight = (step, started, time.perf_counter() - started)
        if not self.engine.checkpoint_engine.background:
            self.check_writer()
        return folder

    def write_failed(self) -> bool:
        """This rank's writer lost a save (checked at every step: the flag joins the step's agreement)."""
        return self.engine.checkpoint_engine.failed

    def check_writer(self) -> None:
        """Collective: if a save failed on any rank (a full disk), every rank stops here with its message,
        the failed save's folder removed; the previous checkpoint is untouched."""
        failure = self.engine.checkpoint_engine.take_failure()
        failures: list = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
        found = [f for f in failures if f]
        if not found:
            return
        message = next((m for m, primary in found if primary), found[0][0])
        folder = self.engine.checkpoint_engine.folder
        if dist.get_rank() == 0 and folder is not None and not (folder / RECORD).exists():
            shutil.rmtree(folder, ignore_errors=True)
        self._in_flight = None
        raise PipelineError(f"{self.stage}: {message}; the failed save was removed and {self.last_good()}: "
                            f"free space there, then rerun the same command to resume from it")

    def finish(self) -> None:
        """Collective: returns once the last save started is complete (its record written)."""
        self.check_writer()
        self.wait()
        with control.long_timeout():
            dist.barrier()  # rank 0's writer commits last

    def record_if_written(self) -> None:
        """Record a save the writer has finished by now, so its metrics need not wait for the next save."""
        writer = self.engine.checkpoint_engine
        if self._in_flight is not None and writer.idle() and not writer.failed:  # a failure: check_writer's
            self.wait()

    def wait(self) -> None:
        """Wait for this rank's writer, then record the save it finished (rank 0 commits)."""
        writer = self.engine.checkpoint_engine
        writer.wait()
        if self._in_flight is None:
            return
        step, started, blocked = self._in_flight
        self._in_flight = None
        if writer.committed_at is not None:
            self.metrics.log({"step": step, "checkpoint_blocked_s": round(blocked, 3),
                              "checkpoint_complete_s": round(writer.committed_at - started, 3)})

    def last_good(self) -> str:
        found = find_resumable(self.root)
        return f"the last good checkpoint is {found[0]}" if found else "there is no complete checkpoint yet"


def universal_checkpoint(source: Path, source_record: dict, stage: str) -> Path:
    """Collective: the universal checkpoint of `source`, reused if one verifies, else converted by rank 0 (the
    other ranks wait: their cores go to DeepSpeed's extract and merge workers)."""
    target = elastic.universal_folder(source)
    source_digest = sha256_file(source / "complete.json")
    record, problem = verify(target, digests=True, collective=True) if target.is_dir() else (None, "")
    if record is not None and record.get("source_record_sha256") != source_digest:
        record, problem = None, f"it was converted from another {source.name}"
    if record is not None:
        if dist.get_rank() == 0:
            log.info("%s: reusing %s, the universal checkpoint of %s", stage, target, source.name)
        return target
    failure = [""]
    if dist.get_rank() == 0:
        if problem:
            log.warning("%s: universal checkpoint %s is redone: %s", stage, target, problem)
        try:
            elastic.convert(source, source_record, source_digest, stage)
        except PipelineError as exc:
            failure = [str(exc)]
        except OSError as exc:  # e.g. another run's read-only checkpoints
            failure = [f"cannot write the universal checkpoint beside {source} ({exc}): copy that checkpoint "
                       f"folder somewhere writable and resume from the copy"]
    with control.long_timeout():  # the conversion may outlast launch.step_timeout_s
        dist.broadcast_object_list(failure, src=0)  # every rank stops with rank 0's reason
    if failure[0]:
        raise PipelineError(failure[0])
    record, problem = verify(target, digests=False, collective=True)
    if record is None:
        raise PipelineError(f"converting {source} to a universal checkpoint failed: {problem}")
    return target
