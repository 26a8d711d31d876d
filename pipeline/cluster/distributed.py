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
        # SLURM_NTASKS_PER_NODE may read "4(x2)"; the count before the bracket is this node's.
        # The deepspeed launcher sets LOCAL_SIZE instead of LOCAL_WORLD_SIZE.
        local_world = int(env.get(keys[3], env.get("LOCAL_SIZE", str(world))).split("(")[0])
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


def gpus_per_node(env: dict[str, str]) -> int | None:
    """GPUs SLURM gave this node: SLURM_GPUS_ON_NODE, else --gpus-per-node ("4" or "h100:4")."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "").split(",")[0].rsplit(":", 1)[-1]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def override_value(overrides: list[str], key: str) -> str | None:
    """The value the last `key=V` (or `+key=V`, `++key=V`) among Hydra overrides gives, else None."""
    found = None
    for item in overrides:
        name, sep, value = item.lstrip("+").partition("=")
        if sep and name == key:
            found = value
    return found


def ranks_per_node(env: dict[str, str], overrides: list[str]) -> tuple[int, str]:
    """Ranks torchrun starts on this node, and what said so: the override launch.nproc_per_node (above 0),
    else NPROC_PER_NODE, else the node's GPUs, else the job's allocation: its tasks per node (the batch
    script's SLURM_NTASKS_PER_NODE, kept as PIPELINE_JOB_NTASKS_PER_NODE since srun's one task per node
    replaces it), else its CPUs over --cpus-per-task, else local_launch's default."""
    value = override_value(overrides, "launch.nproc_per_node")
    if value is not None and value.strip().isdigit() and int(value) > 0:
        return int(value), f"launch.nproc_per_node={int(value)}"
    if env.get("NPROC_PER_NODE"):
        return int(env["NPROC_PER_NODE"]), "NPROC_PER_NODE"
    gpus = gpus_per_node(env)
    if gpus:
        return gpus, "the node's GPUs (SLURM_GPUS_ON_NODE / --gpus-per-node)"
    tasks = env.get("PIPELINE_JOB_NTASKS_PER_NODE", "").split("(")[0]
    if tasks.isdigit() and int(tasks) > 0:
        return int(tasks), "no GPUs: the job's tasks per node (SLURM_NTASKS_PER_NODE, --ntasks-per-node)"
    cpus, per_task = env.get("SLURM_CPUS_ON_NODE", ""), env.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and per_task.isdigit() and int(per_task) > 0 and int(cpus) >= int(per_task):
        return int(cpus) // int(per_task), "no GPUs: the node's CPUs over --cpus-per-task"
    from .local_launch import default_nproc  # imports torch: only when SLURM does not say

    return default_nproc(), "the default (local GPUs, else 2 CPU ranks)"


def slurm_node_env(env: dict[str, str] | None = None, overrides: list[str] = ()) -> dict[str, str]:
    """What `launch/torchrun.sh` needs on one node of a SLURM job that runs one task per node:
    NNODES, NODE_RANK, NPROC_PER_NODE (ranks_per_node; NPROC_SOURCE says why), WORLD_SIZE, MASTER_ADDR
    (the job's first node, where the c10d rendezvous is hosted), MASTER_PORT and RDZV_ID. Variables the
    user set win; `overrides` are the run's Hydra overrides."""
    env = os.environ if env is None else env
    missing = [k for k in ("SLURM_JOB_ID", "SLURM_NODEID") if k not in env]
    nnodes = env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES"))
    nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST"))
    if missing or nnodes is None or nodelist is None:
        raise ValueError("not inside a SLURM job step (SLURM_JOB_ID, SLURM_NODEID, SLURM_JOB_NUM_NODES and "
                         "SLURM_JOB_NODELIST must be set): run this under srun, one task per node")
    nproc, source = ranks_per_node(env, overrides)
    return {"NNODES": str(int(nnodes)), "NODE_RANK": str(int(env["SLURM_NODEID"])), "NPROC_PER_NODE": str(nproc),
            "NPROC_SOURCE": source,
            "WORLD_SIZE": str(int(nnodes) * int(nproc)),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
            # a port per job, so that jobs sharing a node do not collide; stable across requeues
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env["SLURM_JOB_ID"]) % 20000),
            "RDZV_ID": env.get("RDZV_ID") or f"slurm-{env['SLURM_JOB_ID']}"}


def main(argv: list[str]) -> int:
    """`python -m pipeline.cluster.distributed slurm-env [OVERRIDES...]`: shell `export` lines for this node (eval them)."""
    import shlex
    import sys

    if argv[:1] != ["slurm-env"]:
        sys.stderr.write("error: usage: python -m pipeline.cluster.distributed slurm-env [OVERRIDES...]\n")
        return 2
    try:
        variables = slurm_node_env(overrides=list(argv[1:]))
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print("".join(f"export {key}={shlex.quote(value)}\n" for key, value in variables.items()), end="")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
