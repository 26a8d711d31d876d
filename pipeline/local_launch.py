"""Start `launch.nproc_per_node` local ranks through PyTorch's elastic launcher (torchrun's engine)
when distributed stages are asked for outside any launcher."""
from __future__ import annotations

import logging
import os
import socket
import sys
import uuid

from .config import PipelineConfig

log = logging.getLogger(__name__)


class RanksFailed(Exception):
    """The local ranks exited non-zero; they already reported why."""

    def __init__(self, exit_code: int):
        super().__init__(f"local ranks exited with status {exit_code}")
        self.exit_code = exit_code


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() or 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_ranks(cfg: PipelineConfig, overrides: list[str], stages: list[str]) -> None:
    """Re-run this same command for `stages` on N local ranks; returns when all exit 0."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = cfg.launch.nproc_per_node or default_nproc()
    port = cfg.launch.master_port or free_port()
    # each rank gets its share of the cores, as torchrun would arrange
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = [a for a in overrides if not a.lstrip("+").startswith("stages=")] + [f"stages=[{','.join(stages)}]"]
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0,
                          monitor_interval=0.2, rdzv_configs={"timeout": 120})
    log.info("%s: starting %d local ranks", ",".join(stages), nproc)
    try:
        elastic_launch(config, sys.executable)("-m", "pipeline", *args)
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        raise RanksFailed(next((c for c in codes if c and c > 0), 1)) from None
