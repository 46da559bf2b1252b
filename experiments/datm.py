"""Distil a dataset with DATM: `python -m experiments.datm --dataset mnist --ipc 10`.

Difficulty-aligned trajectory matching (Guo et al., ICLR 2024; methods/datm.py): MTT
(experiments/mtt.py, whose flags these are) with initial images that an expert classifies
correctly, soft labels initialised to its logits and learned (`--lr-y`), a start-epoch window
widening from `--max-start-epoch` to `--max-start-epoch-final` over the run, and updates skipped
when the matching loss exceeds `--threshold`. The initial images are chosen by the first expert
after `--max-start-epoch` epochs. The set is saved with its soft labels (probabilities, and the
logits as `label_logits`) and learned learning rate; `experiments.transfer` trains on them with
the soft cross-entropy at that rate. Experts: `python -m experiments.buffer --dataset mnist`.

Presets (our MNIST settings; DATM has none for MNIST):
- `cpu` (default): MTT's cpu settings with the window growing from 2 to 5 on the cpu buffer;
- `paper`: the official CIFAR-10 ipc-10 configuration (80 student steps, expert epochs 2, window
  10 -> 20, images lr 100, soft labels lr 2, threshold 1, 5,000 iterations) on the paper buffer.
"""

from kip.cli import run_main
from kip.command import main_for
from methods.datm import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
