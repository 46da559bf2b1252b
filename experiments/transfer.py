"""Train finite-width networks on a distilled set and compare with real-data baselines:
`python -m experiments.transfer --support FILE.npz --dataset mnist --net convnet --protocol kip`.

The set may be ours, one released by the KIP/LS authors, or another project's (RFAD, FRePo,
DC/DSA/DM, MTT/DATM/PAD, DC-Bench; see kip/readers.py), read without PyTorch. Each seed trains its
own network (all seeds in one jitted step); accuracy is measured on the whole real test split in the
set's own preprocessed space. Rows: the set; `random`, a class-balanced random subset of real
training images of the same size (a different subset per seed), with one-hot labels; `full`, the
whole training split (capped at --full-steps, so it stays affordable on a CPU). Protocols (see
kip/train.py): `kip` = the KIP authors' transfer colab (MSE on the set's labels, SGD momentum, lr
from the empirical NTK, cosine decay); `dc` = DC's evaluation (cross-entropy, SGD 0.01, lr x0.1 at
half; on MNIST DC's crop/scale/rotate per image); `dsa` = the same with DSA's augmentation, the
evaluation of DSA, DM and the trajectory methods; `frepo`, `rfad`, `report`: those papers' own.
Prints a table and writes transfer.json; per-row metrics.jsonl
(test accuracy against step, for `experiments.show --metrics`) and checkpoints go to
<workdir>/<row>/ (the one loop's workdir). Re-running the same command on the same --workdir
resumes, and rows already trained are read back from their checkpoints, not trained again. """

from evaluation.transfer import JOB
from kip.cli import run_main
from kip.command import main_for

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
