"""Target-data-free knowledge distillation with a distilled set as the only inputs:
`python -m experiments.kd --support WORKDIR/distilled.npz --dataset fashion_mnist`.

KRR-ST's third application (Lee et al., ICLR 2024, official code: algorithms/zeroshot_kd.py): a
classifier trained on the target dataset (`--dataset`, its whole training split) is distilled
into a student that never sees a target image: each step the student gets a batch of *inputs*,
augmented by DSA, and learns the teacher's soft predictions on them (cross-entropy to the
teacher's softmax, temperature 1). Rows, by the inputs the student sees:
- `distilled`: the distilled set's images (e.g. a KRR-ST set of MNIST);
- `random`: as many random real images of the set's own (source) dataset;
- `gaussian`: Gaussian noise, drawn afresh every step (no augmentation), as the official code.
Students start from scratch (the official code starts them from a network pre-trained on the
set, which mixes the two effects; `experiments.pretrain` measures pre-training alone) and train
with SGD 0.01, momentum 0.9, weight decay 5e-4, cosine, batch 256. Both networks are the KRR-ST
ConvNet; the teacher predicts in inference mode (the official code leaves it in training mode, so
its batch norm uses the input batch's statistics). Accuracy on the whole target test split, mean
+- std over --seeds.

Writes kd.json and a table; the teacher classifier and each row train in the one loop in
<workdir>/<row>/, so re-running the same command resumes and finished runs are read back.
"""

from evaluation.kd import JOB
from kip.cli import run_main
from kip.command import main_for

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
