#!/usr/bin/env bash
# Run `python -m pipeline OVERRIDES...` through the `deepspeed` launcher.
#   HOSTFILE        MPI-style hostfile ("worker-0 slots=8" per line); unset: this node only
#   NPROC_PER_NODE  ranks per node (default: the hostfile's slots, else local GPUs, else 2 CPU ranks)
#   MASTER_ADDR     address of the first host (default: deepspeed asks it over ssh; 127.0.0.1 locally)
#   MASTER_PORT     (29500)
#   DEEPSPEED_ARGS  more launcher options, e.g. "--launcher openmpi" or "--no_ssh_check"
#   DRY_RUN=1       print the command instead of running it
# Run it on the first host; deepspeed reaches the others over passwordless ssh (pdsh) and exports
# the variables listed in ./.deepspeed_env or ~/.deepspeed_env there. run_dir must be on shared storage.
set -euo pipefail

args=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  if [[ ! -f "$HOSTFILE" ]]; then
    echo "error: HOSTFILE=$HOSTFILE does not exist; write one line per node: '<host> slots=<ranks>'" >&2
    exit 2
  fi
  args+=(--hostfile "$HOSTFILE")
  [[ -n "${NPROC_PER_NODE:-}" ]] && args+=(--num_gpus "$NPROC_PER_NODE")
else
  # no hostfile: this node only, even where deepspeed's default /job/hostfile exists
  # (/dev/null is not a regular file, so deepspeed falls back to local resources)
  if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    gpus=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    NPROC_PER_NODE=$(( gpus > 0 ? gpus : 2 ))
  fi
  # --num_gpus also sets the rank count on CPU machines, where deepspeed sees one "device"
  args+=(--hostfile /dev/null --num_gpus "$NPROC_PER_NODE")
fi
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
read -r -a extra <<< "${DEEPSPEED_ARGS:-}"

# --no_local_rank: the ranks read LOCAL_RANK from the environment; a --local_rank argument
# would not be a valid Hydra override
command=(deepspeed "${args[@]}" "${extra[@]}" --no_local_rank --module pipeline "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
exec "${command[@]}"
