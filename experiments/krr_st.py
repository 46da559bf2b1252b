"""KRR-ST on an unlabelled dataset: `python -m experiments.krr_st --dataset mnist --size 100`.

Self-supervised dataset distillation for transfer learning (Lee et al., ICLR 2024; see
methods/krr_st.py): `--size` images and their target representations, regressed by KRR on a pool
of ConvNets' features onto a Barlow Twins teacher's representations of real images. No label is
used. The teacher comes from `python -m experiments.teacher --dataset <dataset>` (run it first;
`--teacher` names another teacher file); the distillation refuses a teacher trained on another
dataset, and a workdir whose teacher file has changed.

The default preset `cpu` fits a 2-core CPU (pool width 32, 256 real images per step, 2,000 steps,
pool models re-initialised after 100 updates: about 10 minutes); `--preset paper` takes the paper's
sizes (width 128, 1,024 real images per step, 160,000 steps, 1,000 updates: a GPU job). Explicit
flags override the preset. `--no-reset` reproduces the official code's pool, whose counters are
never reset (see methods/krr_st.py). At the start and every `--eval-every` steps the loop
measures the KRR prediction's MSE to the teacher on `--val-size` training images held out of the
distillation, averaged over the pool's models (`krr_validation_mse`). Evaluate the set by
pre-training and fine-tuning with `python -m experiments.pretrain --support WORKDIR/distilled.npz`,
and by knowledge distillation with `python -m experiments.kd --support WORKDIR/distilled.npz`.

Writes config.json, metrics.jsonl, distilled.npz (images + targets) and checkpoints/ in the
workdir; re-running the same command with the same --workdir resumes.
"""

from kip.cli import run_main
from kip.command import main_for
from methods.krr_st import JOB

main = main_for(JOB, __doc__)

if __name__ == "__main__":
  run_main(main)
