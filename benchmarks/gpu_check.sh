#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU; finishes within 8 minutes on one recent GPU.
#   1. data: CIFAR-10 when it is there or can be downloaded, else CIFAR-shaped data (the built-in
#      shapes at 32x32: 50,000 train + 10,000 val PNGs);
#   2. the fast recipe, configs/cifar10_fast.yaml, through launch/single_gpu.yaml (bf16), on the
#      cached path (the whole dataset as uint8 on the GPU, crop/flip/normalise there);
#   3. prints images per second, seconds per epoch and accuracy, then runs the GPU tests.
# Usage: benchmarks/gpu_check.sh [OUT_DIR]       PYTHON=python3 by default (torch with CUDA,
# torchvision, accelerate, safetensors, pyyaml, pillow, numpy, matplotlib, tqdm installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TOOLKIT_CACHE_DIR=$OUT/cache
start=$(date +%s)

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"

DATA=(data.root=data/cifar10)
if ! timeout 90 $PY -c "from toolkit.train.datasets.cifar import load_cifar10; load_cifar10('data/cifar10', download=True)" 2>/dev/null; then
    echo "CIFAR-10 not available: using CIFAR-shaped data (shapes, 32x32, 50,000 + 10,000 images)"
    [ -d "$OUT/shapes" ] || $PY -m toolkit data shapes "$OUT/shapes" --train-per-class 5000 --val-per-class 1000
    DATA=(data.kind=imagefolder "data.root=$OUT/shapes")
fi

$PY -m accelerate.commands.launch --config_file launch/single_gpu.yaml -m toolkit train configs/cifar10_fast.yaml \
    "${DATA[@]}" "train.out_dir=$OUT/runs" name=cifar10_fast train.progress=false 2>&1 | tee "$OUT/train.log" | tail -n 25
run=$(tail -n 1 "$OUT/train.log")

$PY - "$run" <<'PYEOF'
import json, statistics, sys
recs = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
steady = recs[1:] or recs  # epoch 1 includes warm-up (cudnn autotuning, allocator growth)
print(f"\nfast recipe, bf16, cached path: {len(recs)} epochs")
print(f"  images/s (median, epochs 2+): {statistics.median(r['images_per_s'] for r in steady):,.0f}")
print(f"  seconds per epoch (median, epochs 2+): {statistics.median(r['epoch_time_s'] for r in steady):.2f}")
print(f"  seconds of training, all epochs: {sum(r['epoch_time_s'] for r in recs):.1f}")
print(f"  final / best val accuracy: {100 * recs[-1]['val_accuracy']:.2f}% / {100 * max(r['val_accuracy'] for r in recs):.2f}%")
PYEOF

if $PY -c "import pytest" 2>/dev/null; then
    $PY -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -n 5
fi
echo "gpu_check finished in $(( $(date +%s) - start )) s"
