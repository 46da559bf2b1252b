"""The official PAD code (NUS-HPC-AI-Lab/PAD: `buffer/buffer_CL.py`, `distill/PAD.py`) on MNIST,
run offline on a CPU.

Runs under the PyTorch virtual environment of bench/peers/README.md. PAD's code is DATM's with
two changes, so this runner is the DATM runner's (bench/peers/datm/official.py, itself built on
the MTT runner's) with those two changes, taken from the PAD checkout (`--pad-root` or
$PAD_ROOT, with bench/peers/mtt/torch2-compat.patch applied) and its modules:

- `buffer` (`buffer_CL.py`): DATM's GSAM experts on data ordered by difficulty, each class's
  easiest `--init-ratio` first, growing to all of it by epoch `--add-end-epoch`
  (`utils_cl_scheduler.linear_cl_scheduler_acse`), then the easiest `--rm-easy-ratio-first`
  left out after epoch `--rm-epoch-first` and `--rm-easy-ratio-second` after
  `--rm-epoch-second`. The official code reads the order from `data_indices/<sort_method>.pt`
  (a (classes, 5000) table of training-set indices sorted by a precomputed score, CIFAR and Tiny
  ImageNet only); here it comes from `--difficulty`, an `.npz` of the experts' images (their
  indices in the training split), per-image scores (larger = harder) and labels, which
  bench/peers/pad/compare.py writes from our PAD store's EL2N scores, so both sides' experts see
  the same images in the same order of difficulty.
- `distill` (`PAD.py`): DATM's loop with the matching loss summed over the parameters it keeps
  (`matched`): `--mask loss` (the current `PAD.py`, lines 557-568) leaves out the `--loss-ratio`
  of the parameters with the smallest squared error, numerator and denominator alike; `--mask
  depth` (`distill/PAD_depth.py` at commit f1e3e28, removed on 2024-11-25) leaves out the first
  `--depth-ratio` of the flattened parameters in `parameters()` order, the shallowest (the
  paper's selection).
- `evaluate`: DATM's (the official `evaluate_synset` with the soft cross-entropy).

What differs from running `buffer_CL.py` and `PAD.py`, beyond the DATM runner's departures (see
bench/peers/pad/README.md): experts one per file in one process (`buffer_CL.py` starts
`num_experts // 10` processes of 10 experts each, hard-coded: fewer than 10 experts train
nothing); each class's own size where `buffer_CL.py` has `data_size_by_class = 5000`; the
difficulty order from `--difficulty`; `PAD.py`'s `args.loss_threshold_low`, which no config or
default defines (the script stops with an AttributeError at its first iteration), is
`--loss-threshold-low` (default 0: the selection on, as every config's `loss_ratio` intends);
`--seed` where `PAD.py` seeds everything with 42.

    /work/venvs/torch/bin/python bench/peers/pad/official.py buffer --experts 4 --epochs 6 \\
        --difficulty runs/peers/pad/experts/difficulty.npz --out runs/peers/pad/experts/official
    /work/venvs/torch/bin/python bench/peers/pad/official.py distill --mask depth \\
        --depth-ratio 0.5 --buffer runs/peers/pad/experts/official --ipc 10 --out runs/peers/pad/x
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))  # the repository
from bench.peers.datm import official as datm  # noqa: E402
from bench.peers.dm.official import prepare_mnist  # noqa: E402

NUM_CLASSES = datm.NUM_CLASSES
MASKS = ("loss", "depth")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  common = datm.common_flags("--pad-root", "PAD_ROOT", "/work/peers/PAD")
  sub = p.add_subparsers(dest="command", required=True)
  fmt = argparse.ArgumentDefaultsHelpFormatter

  b = sub.add_parser("buffer", parents=[common], formatter_class=fmt,
                     help="train experts as buffer_CL.py does")
  datm.add_buffer_flags(b)
  b.add_argument("--difficulty", required=True,
                 help=".npz: `indices` (n,) of the training split's images the experts see "
                      "(torchvision's order, ascending), their `scores` (n,) float (larger = "
                      "harder) and `labels` (n,) int")
  b.add_argument("--init-ratio", type=float, default=0.75,
                 help="each class's easiest fraction at epoch 0 (README: 0.75)")
  b.add_argument("--add-end-epoch", type=int, default=2,
                 help="the epoch by which every image is in (README: 20)")
  b.add_argument("--rm-epoch-first", type=int, default=2,
                 help="after this epoch the easiest --rm-easy-ratio-first are left out "
                      "(README: 40)")
  b.add_argument("--rm-epoch-second", type=int, default=4,
                 help="after this epoch the easiest --rm-easy-ratio-second (README: 60)")
  b.add_argument("--rm-easy-ratio-first", type=float, default=0.1)
  b.add_argument("--rm-easy-ratio-second", type=float, default=0.2,
                 help="(README: 0.2; the script's default 0.1)")

  d = sub.add_parser("distill", parents=[common], formatter_class=fmt, help="PAD.py's loop")
  datm.add_distill_flags(d)
  d.add_argument("--mask", default="loss", choices=MASKS,
                 help="loss: the current PAD.py (smallest squared errors left out); depth: "
                      "PAD_depth.py of f1e3e28 (the shallowest parameters left out)")
  d.add_argument("--loss-ratio", type=float, default=0.0,
                 help="--mask loss: the fraction left out (configs: 0 / 0.5 / 0.25 at ipc 1 / 10 "
                      "/ 50 on CIFAR-10)")
  d.add_argument("--loss-threshold-low", type=float, default=0.0,
                 help="PAD.py's undefined option: below 1 the loss selection is on")
  d.add_argument("--depth-ratio", type=float, default=0.0,
                 help="--mask depth: the fraction left out (configs: as --loss-ratio)")

  datm.add_evaluate_flags(sub.add_parser("evaluate", parents=[common], formatter_class=fmt,
                                         help="the official evaluate_synset, soft cross-entropy"))
  return p.parse_args(argv)


def selection(args, torch):
  """PAD's `matched` for the DATM runner's loop: (sum of squared errors, sum of squared distances
  to the target) over the parameters the loss keeps."""
  functional = torch.nn.functional

  def matched(student, target, start):
    param_losses = functional.mse_loss(student, target, reduction="none")
    param_dists = functional.mse_loss(start, target, reduction="none")
    if args.mask == "loss":  # PAD.py, lines 557-568
      _, loss_indices = torch.sort(param_losses)
      if args.loss_threshold_low < 1.0:
        keep_indices = loss_indices[int(args.loss_ratio * len(param_losses)):]
      else:
        keep_indices = loss_indices
    else:  # PAD_depth.py (f1e3e28): parameters() order, the shallowest first
      loss_indices = torch.arange(len(param_losses))
      keep_indices = loss_indices[int(args.depth_ratio * len(param_losses)):]
    return param_losses[keep_indices].sum(), param_dists[keep_indices].sum()

  return matched


def curriculum(args, cl_scheduler, scores: np.ndarray, score_labels: np.ndarray):
  """buffer_CL.py's per-epoch images, for the MTT runner's `build_buffer`: labels (n,) ->
  (epoch -> indices), each class's images easiest first (by `scores`), sliced by the class's
  own size (buffer_CL.py: 5000, CIFAR-10's) at buffer_CL.py's fractions."""
  if args.add_end_epoch < 1:  # linear_cl_scheduler_acse divides by it
    sys.exit(f"--add-end-epoch must be at least 1 (buffer_CL.py divides by it), got "
             f"{args.add_end_epoch}")

  def plan(labels_all: np.ndarray):
    if not np.array_equal(labels_all, score_labels):
      sys.exit(f"{args.difficulty}: its labels are not those of the {len(labels_all)} training "
               "images the experts see (another --train-size, seed or order)")
    order = np.argsort(scores, kind="stable")  # easiest first
    rows = [order[labels_all[order] == c] for c in range(NUM_CLASSES)]

    def epoch_indices(e: int) -> np.ndarray:
      if e <= args.add_end_epoch:
        p = cl_scheduler.linear_cl_scheduler_acse(e, args.init_ratio, args.add_end_epoch)
        parts = [row[:int(p * len(row))] for row in rows]
      elif e <= args.rm_epoch_first:
        parts = rows
      elif e <= args.rm_epoch_second:
        parts = [row[int(args.rm_easy_ratio_first * len(row)):] for row in rows]
      else:
        parts = [row[int(args.rm_easy_ratio_second * len(row)):] for row in rows]
      return np.concatenate(parts)

    return epoch_indices

  return plan


def main(argv=None) -> None:
  args = parse_args(argv)
  import torch  # noqa: PLC0415

  torch.set_num_threads(args.threads)
  prepare_mnist(args.mnist_raw, args.cache)
  modules = datm.import_official(args.root, marker="distill/PAD.py")
  if args.command == "buffer":
    with np.load(args.difficulty) as f:  # the experts' images, their scores and labels
      subset, scores, labels = (np.asarray(f[k]) for k in ("indices", "scores", "labels"))
    plan = curriculum(args, importlib.import_module("utils.utils_cl_scheduler"), scores, labels)
    datm.run(args, modules, torch, curriculum=plan, subset=subset)
  else:
    datm.run(args, modules, torch, matched=selection(args, torch) if args.command == "distill"
             else None, name="pad")


if __name__ == "__main__":
  main()
