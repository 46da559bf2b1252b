"""KRR test accuracy of any distilled set, ours, released or another project's (kip/readers.py):
`python -m experiments.evaluate --support FILE.npz --dataset mnist --kernel fc`.

The test split gets the preprocessing the set was made with: the one stored in our files, or for
a released set the one its name says (`zca`: standardisation + KIP's layer norm + ZCA fitted on
the real training split; `nozca`: standardisation with training statistics), or for another
project's the one its family applies (e.g. DC's fixed statistics; see kip/readers.py).
"""

from evaluation.evaluate import JOB
from kip.cli import run_main
from kip.command import main_for

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
