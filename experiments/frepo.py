"""Distil a dataset with FRePo: `python -m experiments.frepo --dataset mnist --ipc 10`.

Neural feature regression with a pool of online ConvNets (Zhou et al., NeurIPS 2022; see
methods/frepo.py). The default preset `cpu` fits a 2-core CPU (first-block width 32, 256 real
images per step, 2,000 steps: about 15 minutes at 10 images per class); `--preset paper` takes the
paper's sizes (width 128, 1,024 real images per step, 500,000 steps: a GPU job). Explicit flags
override the preset. Every `--eval-every` steps the loop measures KRR test accuracy on the
features of the current pool model (`krr_test_acc`, or `krr_validation_acc` on a held-out split
with `--val-size`, which picks distilled_best.npz and with `--patience` stops early); train finite
networks on the result with
`python -m experiments.transfer --support WORKDIR/distilled.npz --protocol frepo`.

Writes config.json, metrics.jsonl, distilled.npz and checkpoints/ in the workdir; re-running the
same command with the same --workdir resumes.
"""

from kip.cli import run_main
from kip.command import main_for
from methods.frepo import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
