"""Distil a dataset with DataDAM: `python -m experiments.datadam --dataset mnist --ipc 10`.

Attention matching (Sajedi et al., ICCV 2023; see methods/datadam.py): each step a freshly drawn
ConvNet-3 compares the spatial attention of its hidden blocks and its final embedding on real and
synthetic images of every class. Presets:

- `cpu` (default): ConvNet-3 width 32, 32 real images per class, 1,000 steps (minutes on a 2-core
  CPU);
- `paper`: the official code's settings (width 128, 64 real per class, 20,000 steps, attention x
  100, MMD x 100 x 0.01, images by SGD lr 1, momentum 0.5);
- `report`: the settings of the report that ran DataDAM on MNIST (ANCHORS.md, "seed settings":
  width 128, 256 real per class, image lr 0.1, lambda 0.01, K 100 x T 10 = 1,000 steps);
- `report_mhist`: the same report on MHIST (`--dataset mhist --manual-dir DIR`, the folder as
  published): ConvNet-7 width 32, 50 images per class, 128 real per class, K 200 x T 10 = 2,000
  steps.

`--power` is p of the attention |f|^p: 4 as the paper's hyperparameter table (the default), 1 as
its code; `--norm batch` (the code's and the maintainers' choice) or `instance` (the paper's).
`--standardise` (ours) writes each image standardised to the real images' average per-image mean
and std: the normalised matching network hardly sees an image's contrast, so SGD inflates it
(5.7x at 1 image per class on MNIST), which the normalised evaluation ConvNet ignores and an MLP
does not.
Every `--eval-every` steps the loop trains a `dc`-protocol ConvNet-3 on the current set for
`--eval-steps` steps and records its accuracy (`finite_test_acc`, or `finite_validation_acc` with
`--val-size`); the full evaluation is `python -m experiments.transfer --support
WORKDIR/distilled.npz --protocol dc`. Writes config.json, metrics.jsonl, distilled.npz and
checkpoints/ in the workdir; re-running the same command with the same --workdir resumes.
"""

from kip.cli import run_main
from kip.command import main_for
from methods.datadam import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
