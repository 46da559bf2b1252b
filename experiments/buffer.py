"""Expert trajectories for trajectory matching: `python -m experiments.buffer --dataset mnist`.

Experts are ConvNets trained on the real training split as MTT's `buffer.py` trains them (SGD lr
0.01, no momentum, no weight decay, batch 256, DSA drawn per image), their parameters stored after
every epoch in an expert store (methods/trajectory.py): one memory-mapped (epochs + 1, params)
file per expert, read two rows at a time by `experiments.mtt`, `experiments.datm` and
`experiments.pad`. Presets:

- `cpu` (default): 4 experts of ConvNet-3 width 32 (instance norm), 6 epochs each (11-28
  minutes of training an expert on this project's 2-core CPU, shared with other jobs);
- `paper`: the official CIFAR-10 buffers (100 experts, width 128, 50 epochs).

`--curriculum pad` trains PAD's experts: each class's images sorted by EL2N difficulty (the mean
over `--score-nets` networks trained `--score-steps` steps), the easiest `--init-ratio` first,
growing linearly to all by epoch `--add-end-epoch`, then the easiest fractions of `--drops`
(`epoch:fraction,...`) left out from those epochs on. PAD's official schedule (0.75, 20,
`40:0.1,60:0.2`) is for 100-epoch experts; the cpu preset scales it to its 6 epochs (2,
`3:0.1,5:0.2`).

The store goes to `--buffer` (default: runs/buffers/<dataset>-<digest of the settings>, where the
distillation commands look); it records every setting that made the experts, and another command
asking for other settings in the same folder is refused. Experts are trained one after another and
kept as they finish; an interrupted expert resumes from its last checkpoint, and `--experts` can
be raised later to add more with the same settings.
"""

from kip.cli import run_main
from kip.command import main_for
from methods.experts import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
