#!/usr/bin/env bash
# The headline transfer runs of the README (MNIST, 10 images per class), on this machine's CPU.
# Each command resumes if re-run; the reports are copied to bench/results/transfer_*.json.
#   KIP_MANUAL_DIR=../shared/data bash bench/transfer_runs.sh
set -euo pipefail
CONV=runs/mnist-conv-ipc10-nol/distilled.npz   # KIP, conv NTK, 200 steps, one-hot labels
FC=runs/mnist-fc-ipc10/distilled.npz           # KIP, FC NTK, 8000 steps, learned labels
run() {
  local name=$1; shift
  python -m experiments.transfer --dataset mnist --seeds 5 --no-progress \
      --workdir "runs/transfer-$name" "$@"
  mkdir -p bench/results
  cp "runs/transfer-$name/transfer.json" "bench/results/transfer_$name.json"
}
# kip protocol at CPU size: width 64 and 1000 steps (the colab: width 1024, 5000 steps).
run conv-convnet64-kip --support "$CONV" --net convnet --protocol kip --width 64 --steps 1000 \
    --eval-every 200 --baselines random
# dc protocol without augmentation: 300 epochs (= 300 steps on 100 images), ConvNet-3 width 128.
run conv-convnet3-dc --support "$CONV" --net convnet3 --protocol dc --augment none \
    --eval-every 50 --baselines random
# Cross-architecture: an MLP (width 1024) under the full kip protocol (5000 steps).
run conv-mlp-kip --support "$CONV" --net mlp --protocol kip --eval-every 500 \
    --baselines random,full --full-steps 5000
run fc-mlp-kip --support "$FC" --net mlp --protocol kip --eval-every 500 --baselines none
# The same conv set in the released layout (only `images` and `labels`, a released-style name):
# preprocessing refitted from the name; must reproduce the conv-mlp-kip distilled row exactly.
RELEASED=runs/released_copy/kip/mnist/ConvNet_ssize100_nozca_nol_noaug_ckpt200.npz
mkdir -p "$(dirname "$RELEASED")"
python -c "import numpy as np, sys; d = np.load(sys.argv[1]); \
np.savez(sys.argv[2], images=d['images'], labels=d['labels'])" "$CONV" "$RELEASED"
run released-mlp-kip --support "$RELEASED" --net mlp --protocol kip --eval-every 500 \
    --baselines none
