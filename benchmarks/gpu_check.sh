#!/usr/bin/env bash
# GPU check: full-size generated cases, 128^3 patches, nnU-Net's widths (hyperparameters_brats2020_gpu.txt),
# trained with automatic mixed precision and then in float32. Prints steps/s, peak GPU memory and the
# autocast dtype of each. About 5 minutes on one recent GPU; writes only to a temporary folder.
#   bash benchmarks/gpu_check.sh [steps_per_epoch]        (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
STEPS=${1:-100}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to this PyTorch'; \
print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| bf16:', torch.cuda.is_bf16_supported())"
DATA=(raw_data_dir="$WORK/raw" prepared_dir="$WORK/prepared" seed=0)
"$PY" synthetic.py "${DATA[@]}" synthetic_cases=6 synthetic_shape=240,240,155
"$PY" prepare_dataset.py "${DATA[@]}" num_workers=4 val_fraction=0.2

# 3 epochs: epoch 1 includes cuDNN's kernel search and worker start-up, epoch 2 is timed, validation
# runs only after epoch 3 (val_every is larger than epochs).
for precision in auto fp32; do
  "$PY" train.py --hp hyperparameters_brats2020_gpu.txt "${DATA[@]}" run_dir="$WORK/run_$precision" \
    precision=$precision epochs=3 steps_per_epoch="$STEPS" val_every=1000 num_workers=8 \
    2>&1 | tr '\r' '\n' | grep -v 'it/s' | tee "$WORK/train_$precision.log"
done

"$PY" - "$WORK" "$STEPS" <<'EOF'
import csv, re, sys
work, steps = sys.argv[1], int(sys.argv[2])
print(f"\n{'precision':<10} {'autocast':<16} {'steps/s':>8} {'patches/s':>10} {'peak GiB':>9} {'val Dice':>9}")
for precision in ("auto", "fp32"):
    log = open(f"{work}/train_{precision}.log").read()
    dtype = re.search(r"process\(es\), (torch\.\w+)", log).group(1)
    peak = max(float(g) for g in re.findall(r"([\d.]+) GiB peak", log))
    rows = list(csv.DictReader(open(f"{work}/run_{precision}/metrics.csv")))
    batch = int(re.search(r"global batch (\d+)", log).group(1))
    rate = steps / float(rows[1]["seconds"])  # epoch 2: no validation, no start-up
    print(f"{precision:<10} {dtype:<16} {rate:>8.2f} {batch * rate:>10.1f} {peak:>9.1f} {float(rows[2]['dice_mean']):>9.3f}")
EOF
