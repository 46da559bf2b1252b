"""One benchmark table across methods, datasets, set sizes, protocols and networks:

  python -m experiments.benchmark --methods dm,datadam --dataset mnist --ipc 1,10 --seeds 5

It plans cells and makes the table; each cell is this project's commands, each in its own workdir
under --root, so an interrupted cell resumes and a finished one is read back, not redone (only for
the settings it was made with: a workdir holding a run with others is refused, naming them):
  distillation  <root>/<method>-<dataset>-ipc<ipc>                (experiments.<method>)
  coresets      <root>/coreset-<select>-<dataset>-ipc<ipc>        (experiments.coreset)
  expert store  the trajectory methods' default (experiments.buffer; PAD's with its curriculum)
  evaluation    <cell>/transfer-<protocol>[-<net>]               (experiments.transfer)
  full data     <root>/full-<dataset>[-steps<N>]/transfer-<protocol>[-<net>]  (N: --full-steps;
                its network is sized by a random 1-per-class set in <cell>/support)
The layout of `bench.methods`, so sets distilled there are reused. Imported sets (`--sets`, any
format `kip.io` reads) are evaluated in <root>/imported-<name>/. Columns: accuracy (mean +- std
over --seeds networks), the published figure of bench/published.json for the same method, dataset
and size (ConvNet rows; with the evaluation it was measured under; for an imported DC file, the
accuracy it records), the gap, and the evaluation's training time.

Cells run one after another, --workers N at once (threads, each waiting on its cell's commands),
or as a SLURM job array: --slurm FILE writes one (a cell per task, this command with --cell
<index>) and runs nothing; once it is done, this command with --table-only reads every cell back.
A cell's commands die with the benchmark (Ctrl-C, SIGTERM, or killed outright). A cell and an
expert store are locked (flock, `.locks/` beside them) while a command works on them, until the
command is gone, so workers or tasks that need one expert store take turns.

Writes <out>/benchmark.md (the table; with a full-data row, the smallest set within a point of
it and its training saving in images processed), benchmark.json (every number with the folder it
came from) and benchmark.png (accuracy and images per network against images per class);
--readme FILE replaces the table between `<!-- benchmark:begin -->` and `<!-- benchmark:end -->`
of a markdown file (this project's: docs/results.md). --archive DIR (committed) keeps what a fresh
checkout reads the table back from: the evaluations' transfer.json and config.json, a distilled
set's config.json, final_metrics.json and, when small, distilled.npz (restored into --root when a
new evaluation needs it); never checkpoints, expert stores or a command in progress.

--preset cpu (default) runs each method at its CPU preset and evaluates at the protocol's
published schedule, the full split capped at --full-steps: on this project's 2-core CPU one
method at 1 and 10 images per class on one dataset takes one to two hours (a 5-seed dc evaluation
at 10 per class about 12 min with --transfer-args "--width 32"). paper: every command at
`--preset paper` (GPU-sized).
"""

import signal

from evaluation.benchmark import JOB, stop_on_sigterm
from kip.cli import run_main
from kip.command import main_for

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  signal.signal(signal.SIGTERM, stop_on_sigterm)
  run_main(main)
