"""Distil a dataset with KIP: `python -m experiments.kip --dataset mnist`.

Writes config.json, metrics.jsonl, distilled.npz and checkpoints/ in the workdir and prints the
final KRR test accuracy. Re-running the same command with the same --workdir resumes.
"""

from kip.cli import run_main
from kip.command import main_for
from methods.kip import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
