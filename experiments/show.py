"""Look at a distilled set or a run's accuracy curve:

  python -m experiments.show FILE.npz --out grid.png
  python -m experiments.show --metrics RUN/metrics.jsonl --out curve.png

The grid shows every image, in rows by class (the argmax of each image's label; a class with more
than --per-class images wraps onto further rows), each captioned with its label's value for that
class (learned labels differ from the one-hot 0.9). Images are mapped back
from preprocessed space with the set's own preprocessing (ours); for a released set it is refitted
on the real training split (needs the data, see --manual-dir); without either, each image is
stretched to [0, 1]. --metrics takes a KIP run's or a transfer row's metrics.jsonl (several,
comma-separated, share one plot; transfer rows show mean +- std over seeds).
"""

from evaluation.show import JOB
from kip.cli import run_main
from kip.command import main_for

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
