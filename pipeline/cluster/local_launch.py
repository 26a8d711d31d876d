"""Start `launch.nproc_per_node` local ranks through PyTorch's elastic launcher (torchrun's engine)
when distributed stages are asked for outside any launcher. The ranks get this process's console
(each points the rest of its output at its own log file, pipeline/observe/console.py)."""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
import uuid
from dataclasses import fields
from pathlib import Path

from ..config import PipelineConfig
from ..observe.console import console_for_local_ranks
from .control import PREEMPTED_FILE_ENV, Preempted, forwarding_to_local_ranks, parse_signals, preempt_requested

log = logging.getLogger(__name__)


class RanksFailed(Exception):
    """The local ranks exited non-zero; they already reported why, unless `message` says it for them."""

    def __init__(self, exit_code: int, message: str | None = None):
        super().__init__(message or f"local ranks exited with status {exit_code}")
        self.exit_code = exit_code
        self.message = message


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() or 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_ranks(cfg: PipelineConfig, overrides: list[str], stages: list[str]) -> None:
    """Re-run this same command for `stages` on N local ranks; returns when all exit 0. Raises Preempted when
    they stopped for a preemption signal (theirs, or ours forwarded to them), RanksFailed when any failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = cfg.launch.nproc_per_node or default_nproc()
    port = cfg.launch.master_port or free_port()
    # each rank gets its share of the cores, as torchrun would arrange
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = [a for a in overrides if not a.lstrip("+").startswith("stages=")] + [f"stages=[{','.join(stages)}]"]
    # The agent turns the signals it handles into a shutdown of the ranks; preemption signals must reach
    # them as they are (forwarding_to_local_ranks), so the agent leaves those to us.
    preempt = parse_signals(cfg.launch.preempt_signals)
    agent_signals = [s.name for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT) if s not in preempt]
    extra = {"signals_to_handle": ",".join(agent_signals)} if "signals_to_handle" in {
        f.name for f in fields(LaunchConfig)} else {}
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0,
                          monitor_interval=0.2, rdzv_configs={"timeout": 120}, **extra)
    log.info("%s: starting %d local ranks", ",".join(stages), nproc)
    with tempfile.TemporaryDirectory(prefix="pipeline-ranks-") as tmp:
        preempted = Path(tmp) / "preempted"  # the ranks write it when they stop for a preemption
        os.environ[PREEMPTED_FILE_ENV] = str(preempted)
        try:
            with forwarding_to_local_ranks(cfg.launch.preempt_signals), console_for_local_ranks():
                elastic_launch(config, sys.executable)("-m", "pipeline", *args)
        except ChildFailedError as exc:
            raise _failure(exc) from None
        except SignalException as exc:  # not a preemption signal: the agent stopped the ranks
            raise RanksFailed(128 + int(exc.sigval), f"stopped by {exc.sigval.name}; the local ranks were "
                                                     f"stopped too") from None
        finally:
            os.environ.pop(PREEMPTED_FILE_ENV, None)
        if preempted.is_file():
            raise Preempted(preempted.read_text().strip())
    if preempt_requested():  # it came after the ranks' last agreement point: their stages are complete
        raise Preempted(f"preempted after stage(s) {','.join(stages)} (complete); rerun the same command to "
                        f"resume")


def _failure(exc) -> RanksFailed:
    """The ranks' exit status; a rank killed by a signal is named here, as it said nothing itself. It comes
    first even when a peer exited before it was seen: that peer only reports having lost it."""
    killed = sorted((failure.timestamp, rank) for rank, failure in exc.failures.items() if failure.exitcode < 0)
    rank, first = (killed[0][1], exc.failures[killed[0][1]]) if killed else exc.get_first_failure()
    codes = [failure.exitcode for failure in exc.failures.values()]
    code = next((c for c in codes if c and c > 0), 1)
    if first.exitcode >= 0:
        return RanksFailed(code)
    try:
        how = signal.Signals(-first.exitcode).name
    except ValueError:
        how = f"signal {-first.exitcode}"
    hint = " (the kernel's out-of-memory killer sends SIGKILL)" if how == "SIGKILL" else ""
    return RanksFailed(code, f"rank {rank} (pid {first.pid}) was killed by {how}{hint}; the other ranks were "
                             f"stopped; rerun the same command to resume from the newest complete checkpoint")
