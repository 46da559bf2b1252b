"""Distil a dataset with RFAD: `python -m experiments.rfad --dataset mnist --ipc 10`.

Random-feature NNGP of freshly sampled ConvNets each step (Loo et al., NeurIPS 2022; see
methods/rfad.py). The default preset `cpu` fits a 2-core CPU (2 nets of width 32 per step, 256
real images, 1,000 steps); `--preset paper` takes the paper's sizes (8 nets of width 256, 5,120
real images per step, 100,000 steps, 16 evaluation nets: a GPU job). Explicit flags override the
preset. Every `--eval-every` steps the loop measures KRR accuracy with `--eval-models` random nets
drawn from a fixed seed (`rf_test_acc`; with `--val-size`, `rf_validation_acc` on a held-out
training split, which picks `distilled_best.npz` and, with `--patience`, stops the run early as
RFAD does; the paper preset holds out 5,000 images with patience 1,000). Train finite networks on
the result with `experiments.transfer`.

Writes config.json, metrics.jsonl, distilled.npz and checkpoints/ in the workdir; re-running the
same command with the same --workdir resumes.
"""

from kip.cli import run_main
from kip.command import main_for
from methods.rfad import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
