"""Control plane of a run: preemption signals, cross-rank flags, process-group timeouts, peer failures.

Note for anyone adding a per-step cross-rank decision: `agree(flags)` is the one control-plane collective
of a step. It all-reduces (MAX) a small CPU int tensor over a separate gloo group, so it never waits for
the accelerator; every rank must call it at the same point with the same keys (True on any rank gives
True everywhere). Add your key to the dict Trainer.fit already passes rather than calling it twice. A
flag computed from a device tensor still costs a host sync to read: that is yours to weigh.

Preemption: the handlers for `launch.preempt_signals` only record the signal. Ranks act on it at
agreement points, the step boundary (Trainer.fit: every rank saves one complete checkpoint at the same
step) and the stage boundary (the runner: no later stage starts). Both raise `Preempted`, which the entry
point turns into one log line and exit 0; rerunning the same command resumes. A process that starts
local ranks forwards the signal to them; ranks tell their launcher (our local one or launch/torchrun.sh)
that they stopped for a preemption by writing the file named in $PIPELINE_PREEMPTED_FILE.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from ..errors import PipelineError

log = logging.getLogger(__name__)

PREEMPT = "preempt"
PREEMPTED_FILE_ENV = "PIPELINE_PREEMPTED_FILE"
# written by launch/torchrun.sh before it passes a signal on: a signal that came while the ranks were still
# starting (no handler yet: lost) is taken from it once the handlers are in place
SIGNALLED_FILE_ENV = "PIPELINE_SIGNALLED_FILE"
UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


class Preempted(Exception):
    """Every rank stopped at an agreement point for a preemption signal; the message says where."""


# -- signals ------------------------------------------------------------------------------------

_requested: signal.Signals | None = None
_forward_to_ranks = False  # set while this process runs local ranks


def parse_signals(names: list[str]) -> list[signal.Signals]:
    """launch.preempt_signals: names such as SIGTERM or USR1."""
    parsed = []
    for name in names:
        key = str(name).strip().upper()
        sig = getattr(signal, key if key.startswith("SIG") else "SIG" + key, None)
        if not isinstance(sig, signal.Signals) or sig in UNCATCHABLE:
            raise PipelineError(f"launch.preempt_signals: {name!r} is not a signal that can be caught; "
                                f"use names such as SIGTERM or SIGUSR1")
        parsed.append(sig)
    return parsed


def install_preemption_handlers(names: list[str]) -> None:
    global _requested
    watched = parse_signals(names)
    for sig in watched:
        signal.signal(sig, _on_signal)
    path = os.environ.get(SIGNALLED_FILE_ENV)
    if path and _requested is None:  # after the handlers: a signal from now on is seen either way
        try:
            name = Path(path).read_text().strip()
        except OSError:
            return
        sent = getattr(signal, name, None)
        if sent in watched:
            _requested = sent
            log.info("launch: %s arrived while this rank was starting: acting on it", name)


def _on_signal(signum: int, frame) -> None:
    global _requested
    _requested = signal.Signals(signum)  # acted on at the next agreement point, never here
    if _forward_to_ranks:
        _forward(signum)


def preempt_requested() -> signal.Signals | None:
    return _requested


def _forward(signum: int) -> None:
    """Pass the signal to our local ranks (the elastic agent starts them in sessions of their own, so a
    signal to this process or its process group never reaches them)."""
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # ppid is the second field after the parenthesised command name
        if int(stat.rsplit(")", 1)[1].split()[1]) == me and cmdline[1:3] == [b"-m", b"pipeline"]:
            try:
                os.kill(int(entry.name), signum)
            except ProcessLookupError:
                pass


@contextmanager
def forwarding_to_local_ranks(names: list[str]):
    """While local ranks run: our preemption signals go to them; the elastic agent keeps the others (it
    turns them into its own shutdown). Its handlers are removed afterwards."""
    global _forward_to_ranks
    watched = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, *parse_signals(names)}
    saved = {sig: signal.getsignal(sig) for sig in watched}
    install_preemption_handlers(names)
    _forward_to_ranks = True
    try:
        yield
    finally:
        _forward_to_ranks = False
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def report_preempted(exc: Preempted) -> None:
    """Where the entry point catches Preempted: tell the user (rank 0) and our launcher (every rank)."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    if rank == 0:
        log.warning("%s", exc)
    path = os.environ.get(PREEMPTED_FILE_ENV)
    if path:
        try:
            Path(path).write_text(f"{exc}\n")
        except OSError as err:
            log.warning("could not write %s=%s (%s)", PREEMPTED_FILE_ENV, path, err)


def stop_if_preempted(next_stage: str) -> None:
    """Stage boundary: with a preemption requested on any rank, no rank starts `next_stage`."""
    requested = preempt_requested() is not None
    if _group is not None:
        requested = agree({PREEMPT: requested})[PREEMPT]
    if requested:
        raise Preempted(f"preempted before stage {next_stage} (the earlier stages are complete); "
                        f"rerun the same command to resume")


# -- process groups -----------------------------------------------------------------------------

_group = None  # the gloo control-plane group
_timeouts = (0.0, 0.0)  # (launch.timeout_s, launch.step_timeout_s)
_current_timeout = 0.0
_peers: list[tuple[str, int, str]] = []  # (host, pid, node name) of every rank


def setup(timeout_s: float, step_timeout_s: float) -> None:
    """Collective, once the default group exists: the control group and the table of peers."""
    global _group, _timeouts, _current_timeout, _peers
    import torch.distributed as dist

    _timeouts, _current_timeout = (float(timeout_s), float(step_timeout_s)), float(timeout_s)
    if _group is not None:
        return
    # gloo even next to NCCL: the flag lives in host memory, so agreeing never syncs the device
    _group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    peers: list = [None] * dist.get_world_size()
    # the node as the job names it (SLURM's node name; several may share one host), else the host
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid(), node), group=_group)
    _peers = [tuple(p) for p in peers]


def shutdown() -> None:
    """End of a rank's run: wait for every rank, then take the process groups down. Exiting with live
    gloo groups can abort a rank (std::terminate in a gloo thread) while a peer still closes its pairs."""
    global _group
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # every group, the control group included
        _group = None


def agree(flags: dict[str, bool]) -> dict[str, bool]:
    """Collective over the control group: each flag is True if it is True on any rank."""
    import torch
    import torch.distributed as dist

    if _group is None:
        return dict(flags)
    keys = sorted(flags)
    values = torch.tensor([int(bool(flags[k])) for k in keys], dtype=torch.int32)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=_group)
    return {k: bool(v) for k, v in zip(keys, values.tolist())}


def _set_timeout(seconds: float) -> None:
    """Timeout of every process group's later collectives: past it a collective fails instead of hanging."""
    global _current_timeout
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if seconds <= 0 or seconds == _current_timeout or not dist.is_initialized():
        return
    try:
        groups = list(c10d._world.pg_map)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # groups of other backends keep their own timeout
            for group in groups:
                try:
                    c10d._set_pg_timeout(timedelta(seconds=seconds), group)
                except (ValueError, RuntimeError):
                    pass  # a group this rank is not part of
    except AttributeError:  # private API: another torch version may lack it
        log.warning("this torch cannot change process-group timeouts; launch.step_timeout_s is not applied")
    _current_timeout = seconds


def long_timeout_s() -> float:
    """launch.timeout_s: how long slow work that peers wait on (init, checkpoint writes) may take."""
    return _timeouts[0] or 600.0


def use_step_timeout() -> None:
    """After the first step: a dead or hung peer now fails the job within launch.step_timeout_s."""
    _set_timeout(_timeouts[1])


def use_long_timeout() -> None:
    _set_timeout(_timeouts[0])


@contextmanager
def long_timeout():
    """Checkpoint saves may keep a rank busy well past one step (slow storage): launch.timeout_s there."""
    previous = _current_timeout
    use_long_timeout()
    try:
        yield
    finally:
        _set_timeout(previous)


# -- peer failures ------------------------------------------------------------------------------

_COMM_MARKERS = ("gloo", "nccl", "connection closed by peer", "connection reset by peer", "broken pipe",
                 "timed out", "timeout")


def peer_failure(exc: BaseException) -> str | None:
    """One line for a collective that failed because another rank died or hung; None for other errors."""
    if "torch.distributed" not in sys.modules:  # no process group: importing torch (seconds) to learn that
        return None                             # would slow every config error
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not (dist.is_available() and dist.is_initialized()) or not isinstance(exc, RuntimeError):
        return None
    text = " ".join(str(exc).split())
    if not isinstance(exc, dist.DistError) and not any(m in text.lower() for m in _COMM_MARKERS):
        return None
    me = dist.get_rank()
    gone = _dead_local_peers(me)
    if gone:
        what = "; ".join(f"rank {r} (pid {pid} on {host}) has exited" for r, host, pid in gone)
    elif "timed out" in text.lower() or "timeout" in text.lower():
        what = f"no answer within {_current_timeout:.0f} s (launch.timeout_s / launch.step_timeout_s)"
    else:
        what = _short(text)
    return (f"rank {me}: a peer rank died or stopped responding ({what}); rerun the same command to resume "
            f"from the newest complete checkpoint")


def _short(text: str) -> str:
    """gloo's message without its source location and boilerplate."""
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(" This is typically")[0][:200]


def _dead_local_peers(me: int) -> list[tuple[int, str, int]]:
    """Peers on this host whose process is gone (a peer elsewhere can't be checked from here)."""
    host = socket.gethostname()
    for _ in range(5):  # a SIGKILLed peer closes its sockets before it is reaped: give /proc a moment
        gone = [(r, node, pid) for r, (h, pid, node) in enumerate(_peers) if r != me and h == host and not pid_alive(pid)]
        if gone:
            return gone
        time.sleep(0.2)
    return []


def pid_alive(pid: int) -> bool:
    """Whether process `pid` on this host is running (a zombie is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        pass
    if sys.platform.startswith("linux"):
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
