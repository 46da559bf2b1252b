"""Distil a dataset with PAD: `python -m experiments.pad --dataset mnist --ipc 10`.

Prioritising alignment (Li et al., 2024; methods/pad.py): DATM (experiments/datm.py, whose flags
these are) on experts trained with PAD's difficulty curriculum, with the shallowest `--ratio` of
the parameters left out of the matching loss (the paper; -1: by images per class as the paper's
settings, 0 at 1, 0.5 at 10, 0.25 at 50 and above). `--mask smallest_error` is the current
official code's variant instead: leave out that fraction of the parameters the student matches
best at each update. Experts: `python -m experiments.buffer --dataset mnist --curriculum pad`
(found where that command puts them, a store of PAD's experts by its settings' digest; `--buffer
DIR` may name any store, plain experts included). Presets: DATM's.
"""

from kip.cli import run_main
from kip.command import main_for
from methods.pad import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
