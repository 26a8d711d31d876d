#!/usr/bin/env bash
# Run `python -m pipeline OVERRIDES...` under torchrun, on this node of a (possibly) multi-node job.
#   NNODES (1)  NODE_RANK (0)  NPROC_PER_NODE (local GPUs, else 2 CPU ranks)
#   MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
# Every node runs this same command with its own NODE_RANK; run_dir must be on shared storage.
set -euo pipefail

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  gpus=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  NPROC_PER_NODE=$(( gpus > 0 ? gpus : 2 ))
fi

exec torchrun \
  --nnodes "${NNODES:-1}" \
  --node_rank "${NODE_RANK:-0}" \
  --nproc_per_node "${NPROC_PER_NODE}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29500}" \
  -m pipeline "$@"
