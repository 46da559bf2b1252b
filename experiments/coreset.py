"""Coreset baselines as distilled sets, `python -m experiments.coreset --dataset mnist --ipc 10
--select herding`: real training images chosen per class by random sampling, herding or greedy
k-center (methods/coreset.py), saved as distilled.npz with one-hot (centred) labels and the
preprocessing, so every command (transfer, evaluate, show, benchmark) treats them like any set.
Takes seconds (herding on MNIST at 50 per class: about half a minute on 2 CPU cores).
"""

from kip.cli import run_main
from kip.command import main_for
from methods.coreset import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
