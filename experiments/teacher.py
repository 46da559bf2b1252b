"""Train a Barlow Twins teacher: `python -m experiments.teacher --dataset mnist`.

KRR-ST regresses onto a self-supervised teacher's representations (methods/barlow.py). This trains
one on the unlabelled training split of `--dataset`: a ResNet-18 backbone (3x3 stem, no max-pool)
and a projector, Barlow Twins' loss on two augmented views per image. The default preset `cpu`
fits a 2-core CPU (backbone width 16, projector 512-512-512, AdamW 2e-3, 3 epochs of batches of
256: about 20 minutes); `--preset paper` is a CIFAR-size recipe for a GPU (width 64, projector
2048-2048-2048, LARS 0.3, weight decay 1e-4, 1,000 epochs, 10 warm-up epochs; the KRR-ST code
ships no teacher training, so this recipe is ours, after the Barlow Twins paper). Explicit flags
override the preset.

The teacher is saved as teacher.msgpack in its workdir, by default
runs/teachers/<dataset>-<digest of the config>, which is where `experiments.krr_st` looks for it:
the same command finds (and resumes) the same teacher, and any other setting makes another one, so
a teacher made with other settings is never reused. At the end the backbone's linear-probe
accuracy (softmax regression on frozen features of the full training split, fixed settings) on
the test split is logged; `--probe-steps 0` skips it.
"""

from kip.cli import run_main
from kip.command import main_for
from methods.barlow import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
