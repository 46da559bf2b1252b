"""Fetch a set the KIP authors released, by name, into a cache, and print its path:

  python -m experiments.fetch kip/mnist/ConvNet_ssize100_zca_l_noaug_ckpt1000.npz
  python -m experiments.evaluate --dataset mnist \\
      --support "$(python -m experiments.fetch kip/mnist/ConvNet_ssize100_zca_l_noaug_ckpt1000.npz)"

Names are paths in the authors' public bucket (https://storage.googleapis.com/kip-datasets/,
listed in its kip/kip.csv and ls/ls.csv, shown by their kip/dataset.ipynb): kip/<dataset>/
<Arch>_ssize<N>_<zca|nozca>_<l|nol>_<aug|noaug>_ckpt<K>.npz for KIP, ls/<dataset>/<Arch>_ssize<N>_
<zca|nozca>.npz for Label Solve; datasets mnist, fashion_mnist, cifar10, cifar100, svhn_cropped.
A fetched set is kept in <cache>/releases/<name> and read from there next time (no network);
offline, the command says in one line where to put a file downloaded elsewhere.
"""

from evaluation.fetch import JOB
from kip.cli import run_main
from kip.command import main_for

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
