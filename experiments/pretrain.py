"""Pre-train on a distilled set, then probe and fine-tune on another dataset:
`python -m experiments.pretrain --support WORKDIR/distilled.npz --dataset fashion_mnist`.

The evaluation of KRR-ST (Lee et al., ICLR 2024): a distilled set is worth what a network
pre-trained on it gains on a *target* task. For each row and seed, a fresh network is pre-trained
on the row's set, then measured on the labelled target dataset (`--dataset`; `--labelled` images
of its training split, class-balanced, or all of it) two ways: (a) a linear probe, softmax
regression on the frozen features (no augmentation, full-batch Adam, fixed settings), and (b) full
fine-tuning with a new head (SGD 0.01, momentum 0.9, weight decay 5e-4, cosine, batch 256, random
crops, every layer trained). Accuracy on the whole target test split, mean +- std over --seeds.

Rows (`--rows`):
- `none`: no pre-training (the probe sees a random network's features);
- `distilled`: the KRR-ST set, pre-trained by MSE to its targets (SGD 0.1, momentum 0.9, weight
  decay 1e-3, 1,000 epochs, as the official code);
- `random`: a random real subset of the source training split of the same size (a different one
  per seed), pre-trained the same way on the teacher's representations of it;
- `teacher`: the Barlow Twins teacher itself (trained on the whole source split), probed and
  fine-tuned as it is: an upper bound, in its own architecture (ResNet-18);
- each set in `--supervised` (KIP, FRePo, ... sets with labels), pre-trained by MSE on its labels
  with FRePo's protocol (Adam, warm-up + cosine, DSA), as KRR-ST's code does for KIP and FRePo.

The default preset `cpu` uses the KRR-ST ConvNet at width 32 and 500 fine-tuning steps (3 seeds
take about 6 minutes per row on a 2-core CPU, pre-training about 5 more); `--preset paper` width
128 and 10,000 steps. Writes pretrain.json and a table; each training run lives in
<workdir>/<row>/<stage>/ (the one loop's workdir), so re-running the same command resumes and
finished runs are read back, not trained again; each row's probe accuracies are kept in
<workdir>/<row>/probe.json and read back when the settings they depend on are unchanged.
"""

from evaluation.pretrain import JOB
from kip.cli import run_main
from kip.command import main_for

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
