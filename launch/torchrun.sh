#!/usr/bin/env bash
# Run `python -m pipeline OVERRIDES...` under torchrun, on this node of a (possibly) multi-node job.
#   NNODES (1)  NODE_RANK (0)  NPROC_PER_NODE (local GPUs, else 2 CPU ranks)
#   MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   RDZV_ID: set it (the same on every node) for a c10d rendezvous at MASTER_ADDR:MASTER_PORT instead of
#   fixed node ranks (launch/slurm_node.sh does).
# Every node runs this same command with its own NODE_RANK; run_dir must be on shared storage.
#
# Preemption (SIGUSR1 or SIGTERM) belongs to the ranks: each records it, they all stop at the same step
# with a complete checkpoint and exit 0 (pipeline/cluster/control.py). So torchrun must neither die of these
# signals nor turn them into a shutdown of its own: it ignores them (inherited from here; the ranks
# install their own handlers) and handles only SIGINT, SIGHUP and SIGQUIT. Whatever reaches this script
# is passed on to the ranks. The ranks say they stopped for a preemption in $PIPELINE_PREEMPTED_FILE:
# only then does a non-zero torchrun status (an old torchrun's own shutdown) become exit 0.
set -euo pipefail

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  gpus=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  NPROC_PER_NODE=$(( gpus > 0 ? gpus : 2 ))
fi
master="${MASTER_ADDR:-127.0.0.1}"
# an unresolvable name would end in pages of rendezvous traceback on every node
if [[ "${NNODES:-1}" != 1 ]] && ! python -c 'import socket, sys; socket.getaddrinfo(sys.argv[1], None)' "$master" 2>/dev/null; then
  echo "error: MASTER_ADDR=$master does not resolve on ${SLURMD_NODENAME:-$(hostname)} (node ${NODE_RANK:-0}): the nodes cannot meet" \
       "there; set MASTER_ADDR to an address of the first node that every node reaches (an IP address works)" >&2
  exit 2
fi
if [[ -n "${RDZV_ID:-}" ]]; then
  placement=(--rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" --rdzv_id "$RDZV_ID")
else
  placement=(--node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi

# the ranks create it only when they stop for a preemption (a name unique to this script's process)
preempted_file="${TMPDIR:-/tmp}/pipeline-preempted.$$.$RANDOM"
# written here before a signal is passed on: ranks still starting (no handler yet) read it once they have one
signalled_file="${TMPDIR:-/tmp}/pipeline-signalled.$$.$RANDOM"
rm -f "$preempted_file" "$signalled_file"
trap 'rm -f "$preempted_file" "$signalled_file" ${PIPELINE_NODE_PID_FILE:+"$PIPELINE_NODE_PID_FILE"}' EXIT

trap '' USR1 TERM
PIPELINE_PREEMPTED_FILE="$preempted_file" PIPELINE_SIGNALLED_FILE="$signalled_file" \
  PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT torchrun \
  --nnodes "${NNODES:-1}" --nproc_per_node "$NPROC_PER_NODE" "${placement[@]}" \
  -m pipeline "$@" &
torchrun=$!

forward() {
  echo "launch: node ${NODE_RANK:-0}: passing SIG$1 to the ranks" >&2
  echo "SIG$1" > "$signalled_file"
  pkill "-$1" -P "$torchrun" -f ' -m pipeline' || true  # the ranks: torchrun's `python -m pipeline` children
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

while kill -0 "$torchrun" 2>/dev/null; do wait "$torchrun" || true; done  # a trap ends `wait` early
status=0
wait "$torchrun" || status=$?
if [[ $status -ne 0 && -e "$preempted_file" ]]; then
  echo "launch: node ${NODE_RANK:-0}: the ranks stopped for a preemption (torchrun status $status)" >&2
  exit 0
fi
exit "$status"
