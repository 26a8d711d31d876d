#!/usr/bin/env bash
# The GPU figures in one prepared run on an H200 (README, Benchmarks): MFU of 125m and 350m, the cost of
# ZeRO 0-3 over a plain loop, with and without model.compile, checkpoint blocking, masked attention and
# the loss's peak memory. The machine has torch 2.11 but no package index, DeepSpeed, Hydra or
# OmegaConf: the wheels in .whl/ (bench/gpu_wheels.py) are installed first, with --no-deps, beside the
# image's torch, which stays.
#
#   bash bench/gpu_suite.sh [--out DIR] [--budget S]   on the GPU machine: install .whl/, run every step,
#                                                      rows to DIR/RESULTS.md (default $OUT)
#   bash bench/gpu_suite.sh --dry-run                  anywhere, offline: check the wheel set against
#                                                      pyproject.toml, print the build and run commands
#   bash bench/gpu_suite.sh --build-wheels             here, with PyPI: make .whl/ (then check it)
#
# The steps run in order of importance, each under a time cap and all within --budget seconds (480):
# a step that would start with too little time left is skipped, one that overruns its cap is stopped,
# and the rows of what finished are in DIR already (each script appends its rows there as it ends,
# bench/train.py after each ZeRO stage's pair).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "error: $*" >&2; exit 2; }

mode=run
out=${OUT:-}
budget=480
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) mode=dry-run ;;
    --build-wheels) mode=build ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a folder"; out=$2; shift ;;
    --budget) [[ $# -ge 2 && $2 =~ ^[0-9]+$ && $2 -ge 60 ]] || die "--budget needs whole seconds, at least 60"
      budget=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

py=${PYTHON:-$(command -v python3 || command -v python)}
wheels=.whl
site=/tmp/gpu-suite-site  # the install target: the image's own site-packages stay as they are

# name, cap in seconds, command: in order of importance. Shapes: 125m at seq 1024 and 350m at seq 2048,
# micro batches of 16k tokens; few steps, since a GPU step's time settles within a few.
s125="--model 125m --seq-len 1024 --micro-batch 16"
s350="--model 350m --seq-len 2048 --micro-batch 8"
timed="--precision bf16 --steps 10 --warmup 3"
steps=(
  "train-125m|110|bench/train.py $s125 $timed --zero 0 1 2 3"
  "train-350m|110|bench/train.py $s350 $timed --zero 0 1 2 3"
  "checkpoint-350m|90|bench/checkpoint.py --model 350m --saves 2"
  "attention-125m|30|bench/attention.py $s125 --doc-len 256"
  "attention-350m|40|bench/attention.py $s350 --doc-len 512"
  "memory-350m|40|bench/memory.py --model 350m --seq-len 2048 --micro-batch 16 --device cuda"
  "compile-125m|90|bench/train.py $s125 $timed --zero 0 2 --compile"
  "compile-350m|100|bench/train.py $s350 $timed --zero 0 2 --compile"
)

print_steps() {
  echo "on the GPU machine, within ${budget} s (the caps in seconds; rows to \$OUT/RESULTS.md):"
  echo "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site $wheels/*.whl"
  echo "  PYTHONPATH=$site python3 bench/gpu_wheels.py installed --wheels $wheels"
  for step in "${steps[@]}"; do
    IFS='|' read -r name cap command <<<"$step"
    printf '  %-16s %4s  python3 %s\n' "$name" "$cap" "$command"
  done
}

case $mode in
  dry-run)
    "$py" bench/gpu_wheels.py check --wheels "$wheels"
    print_steps
    exit 0 ;;
  build)
    "$py" bench/gpu_wheels.py build --wheels "$wheels"
    exit 0 ;;
esac

[[ -n $out ]] || die "no output folder: pass --out DIR or set OUT"
[[ -d $wheels ]] || die "no $wheels/ here: build it with bash bench/gpu_suite.sh --build-wheels, and carry it"
mkdir -p "$out"
started=$SECONDS
exec > >(tee -a "$out/suite.log") 2>&1  # the whole log comes back even if the run is cut short

rm -rf "$site"
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
export BENCH_RESULTS=$out/RESULTS.md PYTHONUNBUFFERED=1
"$py" bench/gpu_wheels.py installed --wheels "$wheels"
# DeepSpeed's FusedAdam is compiled at its first use: for this GPU's architecture only, which saves most
# of that minute.
arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} TORCH_EXTENSIONS_DIR=/tmp/gpu-suite-extensions
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
echo "install and checks: $((SECONDS - started)) s"

printf 'step\trc\tseconds\n' >"$out/steps.tsv"
failed=0
for step in "${steps[@]}"; do
  IFS='|' read -r name cap command <<<"$step"
  left=$((budget - (SECONDS - started)))
  if ((left < 30)); then
    echo "== $name: skipped, ${left} s of the budget left"
    printf '%s\tskipped\t0\n' "$name" >>"$out/steps.tsv"
    continue
  fi
  limit=$((cap < left ? cap : left))
  echo "== $name (at most ${limit} s): python3 $command"
  begin=$SECONDS
  rc=0
  # shellcheck disable=SC2086  # the command's words are split on purpose
  timeout --signal=TERM --kill-after=10 "$limit" "$py" $command || rc=$?
  ((rc == 124)) && echo "== $name: stopped at its ${limit} s cap"
  ((rc == 0)) || failed=$((failed + 1))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - begin))" >>"$out/steps.tsv"
done
echo "suite: $((SECONDS - started)) s, $failed step(s) not completed; rows in $out/RESULTS.md, steps in $out/steps.tsv"
((failed == 0))
