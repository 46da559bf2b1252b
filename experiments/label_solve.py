"""Label Solve: closed-form support labels, `python -m experiments.label_solve --dataset mnist`.

Takes class-balanced real support images (or the images of --support FILE.npz), solves for the
labels that minimise the KRR loss on the target set (by default the whole training split, streamed
in blocks), and reports the KRR test accuracy with one-hot labels and with solved labels. Writes
config.json, metrics.jsonl and distilled.npz in the workdir.
"""

from kip.cli import run_main
from kip.command import main_for
from methods.label_solve import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
