"""Autoencoder-based unsupervised distillation: `python -m experiments.autoencoder --dataset mnist`.

The method of the report that ran it on MNIST (methods/autoencoder.py; ANCHORS.md): a 784-64-784
autoencoder (`--tied`: decoder = encoder transposed) with a linear head, pixels in [0, 1], the
training split cut into train / validation (`--val-size`, 6,000 of 60,000 as the report's 90/10).

1. Phase 1 (WORKDIR/autoencoder/): the autoencoder on real images (MSE, Adam 1e-3 with L2 1e-4,
   batches of 128), early stopping on the validation loss (`--pretrain-patience` epochs); the best
   epoch's weights start phase 2.
2. Phase 2 (WORKDIR): `--samples` synthetic samples (uniform in [0, 1], or `--init primed`:
   0.25 x a random real image + 0.75 x uniform noise) learned together with the autoencoder and
   head (Adam 1e-4, L2 1e-4) by the four-term loss, the weights ramped by `--schedule` (report:
   l_rec 5, w_rec = min(1, (epoch+1)/50), w_div = min(1, (epoch+1)/30); code: l_rec 1, w_rec
   1 -> 1e-3 over 100 epochs), early stopping on validation accuracy (`--patience` epochs;
   distilled_best.npz is the best epoch, the one measured below). The report's remedies:
   `--reconstruct both` (real and synthetic reconstructed together), `--reduction sum`.
3. What the samples are worth (WORKDIR/worth.json, `--probe-seeds` seeds): a fresh autoencoder
   trained on the samples alone (`--worth-steps` full-batch Adam steps), then a linear probe of its
   codes on the labelled training split, tested on the test split; beside it the same with as many
   random real training images, with no pre-training (a random encoder) and with phase 1's
   encoder (trained on all real images). Homogeneity: the mean pairwise distance of each set.

Pictures in WORKDIR: reconstructions.png (an original of every class over phase 1's
reconstruction), samples.png (the samples, grouped by the head's class), curves.png (the four
terms, validation accuracy and homogeneity per epoch), confusion.png (the head on validation).

Presets: `cpu` (default: phase 1 up to 30 epochs, phase 2 up to 40: 4 minutes on a 2-core CPU
shared with another job) and `paper` (the report's: up to 100 + 250 epochs, 4-8 minutes there;
each part stops early). Re-running with the same --workdir resumes each part.
The report's 96.7% is the validation accuracy of the encoder + head trained on real data (step 2's
`validation_acc`); no model there was trained on the samples, which is what step 3 measures.
"""

from kip.cli import run_main
from kip.command import main_for
from methods.autoencoder import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
