"""Distil a dataset with DM: `python -m experiments.dm --dataset mnist --ipc 10`.

Distribution matching (Zhao & Bilen, WACV 2023; see methods/dm.py): DataDAM's command
(experiments/datadam.py) with the embedding term alone and instance norm. Presets: `cpu` (default:
ConvNet-3 width 32, 64 real images per class, 1,000 steps) and `paper` (the official code: width
128, 256 real per class, 20,000 steps, images by SGD lr 1, momentum 0.5). The loop trains a
`dc`-protocol ConvNet-3 on the set every `--eval-every` steps; the full evaluation is
`python -m experiments.transfer --support WORKDIR/distilled.npz --protocol dc`.
"""

from kip.cli import run_main
from kip.command import main_for
from methods.dm import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
