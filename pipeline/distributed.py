"""Where this process sits in a launch: torchrun / deepspeed (RANK, WORLD_SIZE) or srun (SLURM_*)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    under_launcher: bool = False  # started by torchrun, deepspeed or srun (even with a single rank)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "LaunchInfo":
        env = os.environ if env is None else env
        if "RANK" in env and "WORLD_SIZE" in env:
            keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            keys = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")
        else:
            return cls()
        rank, world = int(env[keys[0]]), int(env[keys[1]])
        local_rank = int(env.get(keys[2], rank))
        # SLURM_NTASKS_PER_NODE may read "4(x2)"; the count before the bracket is this node's
        local_world = int(env.get(keys[3], str(world)).split("(")[0])
        return cls(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   under_launcher=True)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-004,010],cpu1" -> "gpu003"."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]


def export_torch_env(env: dict[str, str] | None = None) -> None:
    """Under srun without torchrun, set the variables torch.distributed reads from SLURM's own:
    ranks from SLURM_PROCID/NTASKS/LOCALID, the master from MASTER_ADDR or the job's first node."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env:
        return
    info = LaunchInfo.from_env(env)
    env.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
               LOCAL_WORLD_SIZE=str(info.local_world_size))
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))))
    env.setdefault("MASTER_PORT", "29500")
