"""Distil a dataset with MTT: `python -m experiments.mtt --dataset mnist --ipc 10`.

Matching training trajectories (Cazenavette et al., CVPR 2022; methods/mtt.py): a student network
starts from an expert's parameters after a random epoch t < `--max-start-epoch`, takes
`--syn-steps` SGD steps on the synthetic set (DSA per image) at a learned learning rate, and its
end point is pulled toward the expert's parameters `--expert-epochs` later (the squared distance
normalised by the expert's own). Images and the learning rate are learned by SGD with momentum
0.5. The experts come from `python -m experiments.buffer` (same --dataset and --preset: the store
is found where that command puts it, or give `--buffer DIR`); the network is the experts' own.

Presets (our MNIST settings: MTT has none for MNIST):
- `cpu` (default): 10 student steps of at most 100 images (all of them up to 10 per class on
  10-class data), expert epochs 2, start epochs below 4, 300 iterations, images lr 100,
  learning-rate lr 1e-5, on the cpu buffer (4 experts, width 32, 6 epochs);
- `paper`: the official CIFAR-10 ipc-10 configuration (30 student steps, expert epochs 2, start
  epochs below 20, 5,000 iterations, images lr 1,000 on ZCA images, lr lr 1e-5, initial lr 0.01)
  on the paper buffer (100 experts of width 128, 50 epochs).

Every `--eval-every` iterations the loop trains a `dc`-protocol ConvNet (the experts' width) on
the current set at its learned learning rate for `--eval-steps` steps. The set's file carries the
learned rate (`lr`), which `experiments.transfer` uses. Writes config.json, metrics.jsonl,
distilled.npz and checkpoints/ in the workdir; re-running the same command resumes.
"""

from kip.cli import run_main
from kip.command import main_for
from methods.mtt import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
