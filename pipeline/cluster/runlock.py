"""One job at a time per run_dir: the run lock, `run_dir/locks/run.lock`.

The lock is a small JSON file (job, host, pid, started) published atomically (written under a temp name,
then `os.link`ed into place, which fails if it exists, on local disks and NFS alike) by the first process
of a job: the command the user started, or rank 0 under a launcher. The job's other processes (the local
ranks that command starts, which inherit RUN_LOCK_ENV; every other rank and node of a torchrun, deepspeed
or srun job) find their own job in it and go on. Any other job is refused with one `error:` line.

A job is named by SLURM_JOB_ID (kept across a requeue, so a requeued job takes its own lock back), else by
its launcher (TORCHELASTIC_RUN_ID, else MASTER_ADDR:MASTER_PORT, which no two live jobs share), else by the
process itself. A lock whose holder is gone is taken over with a warning: on the holder's host when its
pid has exited; from another host when its heartbeat is older than `launch.lock_stale_s` (the holder
touches the file every HEARTBEAT_S from a thread of its own, never from the training loop).

Shard parts (`shard.worker_index` with `shard.num_workers` > 1, as the array tasks of
launch/shard_array.sbatch run them) write disjoint folders at once by design: each takes
`locks/shard-partNNN.lock` instead, and refuses to start while another job holds the run lock; a whole
run refuses to start while a part is being written.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from ..errors import PipelineError
from .control import pid_alive

log = logging.getLogger(__name__)

RUN_LOCK_ENV = "PIPELINE_RUN_LOCK_JOB"  # set by the holder for the processes it starts (its local ranks)
HEARTBEAT_S = 10.0
BREAK_STALE_S = 60.0  # a takeover that crashed half-way leaves its `.break` file: ignored after this


@dataclass(frozen=True)
class Holder:
    job: str
    host: str
    pid: int
    started: str  # UTC, ISO 8601
    pid_start: str = ""  # the pid's start time (/proc): a reused pid is not the holder

    def describe(self) -> str:
        return f"job {self.job} on host {self.host} since {self.started} (pid {self.pid})"


def job_identity(env: dict[str, str] | None = None) -> str:
    """What every process of one job has in common, and no other live job has."""
    env = os.environ if env is None else env
    if env.get(RUN_LOCK_ENV):
        return env[RUN_LOCK_ENV]
    if env.get("SLURM_JOB_ID"):
        return env["SLURM_JOB_ID"]
    if env.get("TORCHELASTIC_RUN_ID") not in (None, "", "none"):  # torchrun's default id is "none"
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT") and "RANK" in env:
        return f"launcher-{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    return f"local-{socket.gethostname()}-{os.getpid()}"


def _pid_start(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _me(job: str) -> Holder:
    return Holder(job=job, host=socket.gethostname(), pid=os.getpid(),
                  started=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), pid_start=_pid_start(os.getpid()))


def read_holder(path: Path) -> tuple[Holder | None, float]:
    """The lock's holder and the age of its heartbeat in seconds; (None, 0) when there is no lock."""
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None, 0.0
    try:
        fields = json.loads(text)
        holder = Holder(**{k: fields[k] for k in ("job", "host", "pid", "started")}, pid_start=fields.get("pid_start", ""))
    except (ValueError, KeyError, TypeError):  # not ours or damaged: treat as a holder that is gone
        holder = Holder(job="unknown", host="unknown", pid=0, started="unknown")
    return holder, max(0.0, time.time() - mtime)


def gone_reason(holder: Holder, age_s: float, stale_s: float) -> str | None:
    """Why the holder no longer holds the lock, or None while it may still be running."""
    if holder.job == "unknown":
        return "the lock file is unreadable"
    if holder.host == socket.gethostname():
        if not pid_alive(holder.pid):
            return f"its process (pid {holder.pid}) has exited"
        if holder.pid_start and _pid_start(holder.pid) != holder.pid_start:
            return f"its process (pid {holder.pid}) has exited (the pid now belongs to another process)"
        return None
    if age_s > stale_s:
        return f"its heartbeat stopped {age_s:.0f} s ago (launch.lock_stale_s={stale_s:g})"
    return None


class RunLock:
    """A lock this process took (`owner`: it heartbeats and removes it) or found held by its own job."""

    def __init__(self, path: Path, holder: Holder, owner: bool):
        self.path, self.holder, self.owner = path, holder, owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start_heartbeat(self, interval_s: float = HEARTBEAT_S) -> None:
        self._thread = threading.Thread(target=self._beat, args=(interval_s,), name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            found, _ = read_holder(self.path)
            if found != self.holder:
                log.warning("run lock %s is no longer this job's (%s); another job took it over", self.path,
                            found.describe() if found else "removed")
                return
            try:
                os.utime(self.path)
            except OSError as exc:  # a full or flaky disk must not stop training; a stale lock is taken over
                log.warning("run lock %s: heartbeat failed (%s)", self.path, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.owner and read_holder(self.path)[0] == self.holder:
            self.path.unlink(missing_ok=True)


def _publish(path: Path, holder: Holder, replace: bool = False) -> bool:
    """Write the lock file whole under a temp name, then link (or, replacing our own job's, rename) it into
    place; False when another process's lock is there."""
    tmp = path.with_name(f"{path.name}.{holder.host}.{holder.pid}.tmp")
    tmp.write_text(json.dumps(asdict(holder)) + "\n")
    try:
        if replace:
            os.replace(tmp, path)
            return True
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _break(path: Path, seen: Holder) -> None:
    """Remove a lock whose holder is gone, unless another process took it over first."""
    breaker = path.with_name(path.name + ".break")
    try:
        os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        try:
            if time.time() - breaker.stat().st_mtime > BREAK_STALE_S:
                breaker.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return
    try:
        if read_holder(path)[0] == seen:
            path.unlink(missing_ok=True)
    finally:
        breaker.unlink(missing_ok=True)


def in_use(what: str, holder: Holder) -> PipelineError:
    return PipelineError(f"{what} is in use by {holder.describe()}: wait for that job to end or stop "
                         f"it, or use another run_dir (a lock whose holder is gone is taken over)")


def acquire(path: Path, run_dir: Path, job: str, leader: bool, stale_s: float, what: str | None = None) -> RunLock:
    """Take the lock at `path` for `job`, or join it if `job` holds it. Only the `leader` (the user's command,
    or rank 0) takes, reclaims or takes over a lock; the job's other processes check it. `what` the lock
    guards, for the error: `run_dir RUN_DIR` unless told."""
    what = what or f"run_dir {run_dir}"
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _me(job)
    for _ in range(50):
        holder, age = read_holder(path)
        if holder is None:
            if not leader:
                return RunLock(path, me, owner=False)  # the leader has not taken it yet, or has left already
            if _publish(path, me):
                return RunLock(path, me, owner=True)
            continue
        if holder.job == job:
            if not leader or (holder.host, holder.pid) == (me.host, me.pid):
                return RunLock(path, holder, owner=False)
            if holder.host == me.host and gone_reason(holder, age, stale_s) is None:
                raise in_use(what, holder)  # the same job id twice at once (two commands in one allocation)
            log.info("run lock: %s restarted (a requeue): taking its lock back", holder.describe())
            _publish(path, me, replace=True)
            return RunLock(path, me, owner=True)
        reason = gone_reason(holder, age, stale_s)
        if reason is None:
            raise in_use(what, holder)
        if not leader:
            return RunLock(path, me, owner=False)
        log.warning("run lock %s: taking it over from %s: %s", path, holder.describe(), reason)
        _break(path, holder)
    raise PipelineError(f"could not take the run lock {path}: other processes keep taking it; check what else "
                        f"runs on {run_dir}")


def check_free(path: Path, job: str, stale_s: float, what: str) -> None:
    """Refuse if another job holds the lock at `path` and is still running."""
    holder, age = read_holder(path)
    if holder is not None and holder.job != job and gone_reason(holder, age, stale_s) is None:
        raise in_use(what, holder)


@contextmanager
def run_lock(layout, stale_s: float, leader: bool, part: int | None) -> Iterator[RunLock]:
    """Hold the run's lock (or shard part `part`'s) for the duration of the block. Released on the way out
    whatever ends the block (an error, a preemption); a killed holder's lock is taken over later."""
    job = job_identity()
    if part is None:
        lock = acquire(layout.run_lock, layout.run_dir, job, leader, stale_s)
    else:
        lock = acquire(layout.part_lock(part), layout.run_dir, job, leader, stale_s,
                       what=f"shard part {part} of run_dir {layout.run_dir}")
    set_env = lock.owner and RUN_LOCK_ENV not in os.environ
    try:
        if part is None:
            for other in sorted(layout.locks.glob("shard-part*.lock")):
                part_name = other.stem.removeprefix("shard-part")
                check_free(other, job, stale_s, what=f"shard part {int(part_name)} of run_dir {layout.run_dir}")
        else:
            check_free(layout.run_lock, job, stale_s, what=f"run_dir {layout.run_dir}")
        if lock.owner:
            lock.start_heartbeat()
        if set_env:
            os.environ[RUN_LOCK_ENV] = job  # the local ranks this process starts belong to its job
        yield lock
    finally:
        if set_env:
            os.environ.pop(RUN_LOCK_ENV, None)
        lock.release()
