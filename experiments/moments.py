"""Distil a dataset by moment matching: `python -m experiments.moments --dataset mnist --ipc 10`.

The smallest complete distiller (methods/moments.py): per class, the mean and standard deviation of
random linear features of the synthetic images are matched to a real batch's. Writes config.json,
metrics.jsonl, distilled.npz and checkpoints/ in the workdir; re-running resumes.
"""

from kip.cli import run_main
from kip.command import main_for
from methods.moments import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
