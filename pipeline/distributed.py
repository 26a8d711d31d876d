"""Where this process sits in a launch: torchrun / deepspeed (RANK, WORLD_SIZE) or srun (SLURM_*)."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def under_launcher(self) -> bool:
        return self.world_size > 1

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
        return cls(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)
