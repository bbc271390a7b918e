#!/usr/bin/env bash
# The GPU check: one command for a machine with CUDA GPUs. It writes only to a temporary folder and prints
# one table for docs/gpus.md:
#   - pytest -m cuda: training and resume, predict on the GPU vs the CPU, float16 + GradScaler,
#     channels_last on vs off, torch.compile, the process group's collectives
#   - steps/s and peak GPU memory of hyperparameters_brats2020_gpu.txt's model (its widths) on its 128^3
#     patches, for bf16 / fp16 / fp32 x channels_last off / on
#   - the DataLoader's patches/s with its num_workers against the GPU's step rate, and the seconds that
#     nnU-Net's augmentation takes batched on the GPU (its share of a training step)
#   - torchrun over all GPUs for 2 short epochs (NCCL from 2 GPUs on)
#   - whole-case predict time with and without mirror TTA
# Meant to finish within 8 minutes on one GPU; without a GPU it says so and exits 0.
#   bash benchmarks/gpu_check.sh            (PYTHON=... for another interpreter; default .venv/bin/python)
# GPU_CHECK_TINY=1 runs every step on the CPU with a tiny model and patch (tests/test_gpu_check.py does).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  GPUS=2 SHAPE=40,40,32 STEPS=1 TESTS=tests/test_cuda.py
  SIZE=(device=cpu features=4,8,16 patch_size=16,16,16 num_workers=2 sw_batch_size=8 augment_on=device)
else
  FOUND=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0, \
torch.__version__)" 2>&1 | tail -n 1)
  read -r GPUS TORCH <<< "$FOUND"
  if ! [[ "$GPUS" =~ ^[0-9]+$ ]]; then
    echo "gpu_check: $PY cannot import torch ($FOUND); run make .venv/.requirements-dev or set PYTHON=..."
    exit 1
  elif [ "$GPUS" = 0 ]; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch $TORCH): nothing to check"
    exit 0
  fi
  SHAPE=240,240,155 STEPS=10 TESTS=tests SIZE=()
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
RESULTS=$WORK/results.jsonl
# num_folds=1: 4 generated cases make one train/validation split, not the GPU settings' 5 folds
HP=(--hp hyperparameters_brats2020_gpu.txt raw_data_dir="$WORK/raw" prepared_dir="$WORK/prepared"
    run_dir="$WORK/run" prediction_dir="$WORK/predictions" seed=0 num_folds=1 "${SIZE[@]}")
FAILED=()

TIMEOUT=$(command -v timeout)  # coreutils; where it is missing, steps run without a time limit
run_step() {  # NAME SECONDS COMMAND...: run with a time limit, output into $WORK/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "gpu_check: $name" >&2
  ${TIMEOUT:+"$TIMEOUT" "$limit"} "$@" > "$WORK/$name.log" 2>&1
}
measure() {  # NAME SECONDS COMMAND...: as run_step; a failure becomes a FAILED row
  local name=$1
  if ! run_step "$@"; then
    FAILED+=("$name")
    "$PY" benchmarks/gpu_check.py failed "$RESULTS" --check "$name" --log "$WORK/$name.log"
  fi
}

run_step pytest 300 "$PY" -m pytest -q -p no:cacheprovider -m cuda "$TESTS"
RC=$?
[ $RC = 0 ] || FAILED+=(pytest)
"$PY" benchmarks/gpu_check.py pytest "$RESULTS" --rc $RC --log "$WORK/pytest.log"

measure generate 180 "$PY" synthetic.py "${HP[@]}" synthetic_cases=4 synthetic_shape="$SHAPE"
measure prepare 180 "$PY" prepare_dataset.py "${HP[@]}" val_fraction=0.25
measure steps 240 "$PY" benchmarks/gpu_check.py steps "$RESULTS" --steps "$STEPS" "${HP[@]}"
measure loader 120 "$PY" benchmarks/gpu_check.py loader "$RESULTS" "${HP[@]}"

run_step torchrun 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" train.py "${HP[@]}" \
  run_dir="$WORK/torchrun" epochs=2 steps_per_epoch="$STEPS" val_every=1
RC=$?
[ $RC = 0 ] || FAILED+=(torchrun)
"$PY" benchmarks/gpu_check.py torchrun "$RESULTS" --rc $RC --log "$WORK/torchrun.log" --processes "$GPUS" \
  "${HP[@]}" run_dir="$WORK/torchrun" steps_per_epoch="$STEPS"

measure predict 240 "$PY" benchmarks/gpu_check.py predict "$RESULTS" "${HP[@]}"

"$PY" benchmarks/gpu_check.py table "$RESULTS"
for name in "${FAILED[@]}"; do
  echo -e "\n---- $name failed; the end of its output:"
  tail -n 25 "$WORK/$name.log"
done
[ ${#FAILED[@]} = 0 ]
