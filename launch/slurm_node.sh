#!/usr/bin/env bash
# One node of launch/slurm.sbatch (srun starts it once per node): this node's variables from SLURM's
# and the run's overrides (`python -m pipeline.cluster.distributed slurm-env OVERRIDES`: NNODES, NODE_RANK,
# NPROC_PER_NODE from launch.nproc_per_node, NPROC_PER_NODE, the GPUs or the allocation, MASTER_ADDR, ...),
# then torchrun with a c10d rendezvous on the job's first node. Arguments go to `python -m pipeline`.
# Preemption signals are handled as launch/torchrun.sh describes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."

# where launch/slurm.sbatch finds this node's launch/torchrun.sh (this pid: exec below) to pass SIGUSR1 on
export PIPELINE_NODE_PID_FILE="${TMPDIR:-/tmp}/pipeline-node.${SLURM_JOB_ID:-0}.${SLURM_NODEID:-0}"
echo $$ > "$PIPELINE_NODE_PID_FILE"

node_env=$(python -m pipeline.cluster.distributed slurm-env "$@")  # a bad SLURM environment fails the task here
eval "$node_env"
echo "slurm: node $NODE_RANK of $NNODES (${SLURMD_NODENAME:-$(hostname)}): $NPROC_PER_NODE ranks of $WORLD_SIZE" \
     "(ranks per node from $NPROC_SOURCE), rendezvous $RDZV_ID at $MASTER_ADDR:$MASTER_PORT"

exec "$here/torchrun.sh" "$@"  # NNODES, NPROC_PER_NODE, MASTER_*, RDZV_ID from slurm-env
