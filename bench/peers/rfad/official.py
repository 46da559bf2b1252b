"""The official RFAD code (yolky/RFAD, `run_distillation.py`) on MNIST, run offline on a CPU.

Runs under the PyTorch virtual environment of bench/peers/README.md (plus `torch-optimizer`, for
AdaBelief, and `matplotlib`, which the official modules import), never under the project's Python.
It imports the official `data`, `coresets`, `models` and `distillation` from a checkout outside this
repository (`--rfad-root` or $RFAD_ROOT, with `rfad_compat.patch` applied), repeats the MNIST
branch of `run_distillation.py` statement for statement (`data.get_mnist`, `coresets.make_coreset`,
the validation draw, `models.ConvNet_wide` with `chopped_head=True`, the model schedule) and calls
the official `distillation.distill_dataset` unchanged.

What differs from running `run_distillation.py`, on purpose (listed in bench/peers/README.md):
- sizes are flags: the ConvNet's width (`ConvNet_wide(net_width=width // 2, k=2)`; the official
  is 128 x 2 = 256), the models per step (`--n_models`), the real images per batch (hard-coded
  1,280 in `distill_dataset`; the patch makes it the function's own `batch_size` argument) and
  the batches per step (`--n_batches`), the validation images per class (500);
- the run stops right after the official validation at step `--steps` (a multiple of 40, the
  official validation cadence): the official loop runs 100,000 steps unless its early stopping
  (patience 1,000) ends it first, and only then writes `best.npz`. The set after exactly
  `--steps` updates is the official dump `<steps>.npz`; `best.npz` is written here from the
  official dumps as the official early stopping would have chosen it (lowest validation loss,
  first one on ties);
- Python's global `random`, from which the official loop draws the seed of every step's models
  unseeded, is seeded by `--seed`; torchvision is imported without its compiled operators (the
  wheel at hand is a CUDA build; nothing here uses them); MNIST is read from `--mnist-raw`
  (extracted once to `--cache`), never downloaded.

Writes to `--out`: the official dumps `<i>.npz` every 40 steps and `training_log.txt`, `best.npz`
(as the official early stopping would write it), and `official.json`: settings, commit, the
official validation log (step, loss, accuracy), the loop's CPU seconds (`time.process_time`,
data loading excluded) with and without the official validation (`Hooks`: every 40 steps the
dump, the set's features from 16 fixed networks, the solve and the prediction of the validation
images; their features once before the loop), and wall seconds.
The sets hold `images` (N, 1, 28, 28) standardised with the training split's mean and std,
`labels` (N, 10) learned labels, `k` and `jit`: `kip.io.load_distilled` reads them (`npz_platt`).

    /work/venvs/torch/bin/python bench/peers/rfad/official.py --ipc 10 --steps 1000 --out DIR
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import re
import sys
import time
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))
sys.path.insert(0, REPO)  # run as a script: the shared helpers (numpy only, no jax)
from bench.peers.common import write_json  # noqa: E402
from bench.peers.dm.official import git_commit, prepare_mnist  # noqa: E402

VALIDATE_EVERY = 40  # distill_dataset validates (and dumps the set) every 40 steps
VALID_LINE = re.compile(r"iter: (\d+), valid loss: (\S+), valid acc: (\S+), elapsed time")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--rfad-root", default=os.environ.get("RFAD_ROOT", "/work/peers/RFAD"),
                 help="patched checkout of yolky/RFAD (or $RFAD_ROOT)")
  p.add_argument("--mnist-raw", default="/work/shared/data/mnist",
                 help="folder with MNIST's four idx .gz files")
  p.add_argument("--cache", default="/work/peers/cache/rfad",
                 help="working folder of get_mnist, whose './data/MNIST/raw' is filled once")
  p.add_argument("--out", required=True, help="output folder (the official save_path)")
  p.add_argument("--ipc", type=int, default=10, help="--samples_per_class")
  p.add_argument("--steps", type=int, default=1000,
                 help="updates before the run stops (a multiple of 40; official: 100,000 or "
                      "early stopping)")
  p.add_argument("--width", type=int, default=32,
                 help="ConvNet channels, even (official: 256 = net_width 128 x k 2)")
  p.add_argument("--num-models", type=int, default=2, help="--n_models (official 8)")
  p.add_argument("--batch-size", type=int, default=256,
                 help="real images per batch (official 1280, hard-coded)")
  p.add_argument("--n-batches", type=int, default=1, help="--n_batches (official 4)")
  p.add_argument("--val-per-class", type=int, default=500,
                 help="validation images per class (official 500, hard-coded)")
  p.add_argument("--lr", type=float, default=1e-3, help="--lr")
  p.add_argument("--jit", type=float, default=5e-3, help="--jit")
  p.add_argument("--platt", action="store_true", help="--platt")
  p.add_argument("--learn-labels", type=int, default=1, choices=(0, 1), help="--learn_labels")
  p.add_argument("--init", default="random", choices=("random", "noise"),
                 help="--init_strategy")
  p.add_argument("--seed", type=int, default=0, help="--seed")
  p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
  args = p.parse_args(argv)
  if args.steps < VALIDATE_EVERY or args.steps % VALIDATE_EVERY:
    p.error(f"--steps must be a positive multiple of {VALIDATE_EVERY}, the official validation "
            "cadence (the set after step N is dumped only there)")
  if args.width % 2:
    p.error("--width must be even (ConvNet_wide's net_width x k with the official k = 2)")
  return args


def import_official(root: str) -> types.SimpleNamespace:
  """The official modules, imported from the checkout (torchvision without its _C ops)."""
  for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(name, types.ModuleType(name))
  if not os.path.exists(os.path.join(root, "distillation.py")):
    sys.exit(f"{root}: not an RFAD checkout (no distillation.py); pass --rfad-root")
  with open(os.path.join(root, "distillation.py")) as f:
    if "DEVICE" not in f.read():
      sys.exit(f"{root}: rfad_compat.patch is not applied (see bench/peers/README.md)")
  sys.path.insert(0, root)  # the official modules import each other by top-level name
  import coresets  # noqa: PLC0415
  import data  # noqa: PLC0415
  import distillation  # noqa: PLC0415
  import models  # noqa: PLC0415
  import random_features  # noqa: PLC0415
  sys.path.remove(root)
  return types.SimpleNamespace(coresets=coresets, data=data, distillation=distillation,
                               models=models, random_features=random_features)


class StopAtStep(Exception):
  """Raised by the log hook once the official validation of the last step has been printed."""


class Hooks:
  """Instruments the official loop without changing what it computes, through its
  `double_print` (the validation lines; the stop after the last step's) and its
  `get_random_features`: the CPU seconds of the official validation, so that the loop is reported
  with and without it. A validation is everything between the loop's `file_print(acc)` and its
  `file_print('iter: ...')` (the dump, the set's features from 16 fixed networks, the solve and
  the prediction of the validation images), plus the validation images' features once before
  the loop."""

  def __init__(self, official, steps: int, cpu0: float):
    self.steps = steps
    self.cpu0 = self.last_print = cpu0
    self.validation_cpu = 0.0
    self.in_loop = False
    self.log: list[list[float]] = []  # [step, loss, accuracy, loop CPU-s, validation CPU-s]
    self._print = official.distillation.double_print
    self._features = official.random_features.get_random_features
    official.distillation.double_print = self.double_print
    official.random_features.get_random_features = self.get_random_features

  def double_print(self, text, output_file=None, end="\n"):
    self._print(text, output_file=output_file, end=end)
    now = time.process_time()
    self.in_loop = True
    match = VALID_LINE.match(str(text))
    if match:
      self.validation_cpu += now - self.last_print
      step = int(match[1])
      self.log.append([step, float(match[2]), float(match[3]), now - self.cpu0,
                       self.validation_cpu])
      if step == self.steps:
        raise StopAtStep
    self.last_print = time.process_time()

  def get_random_features(self, *args, **kwargs):
    cpu0 = time.process_time()
    try:
      return self._features(*args, **kwargs)
    finally:
      if not self.in_loop:  # the validation images' features (inside the loop: counted above)
        self.validation_cpu += time.process_time() - cpu0


def write_best(out: str, log: list[list[float]], jit: float) -> dict:
  """`best.npz` as the official early stopping writes it: the dump of the first step with the
  lowest validation loss, with `valid_loss` and `best_iter`."""
  step, loss = min(((int(r[0]), r[1]) for r in log), key=lambda r: (r[1], r[0]))
  with np.load(os.path.join(out, f"{step}.npz")) as dump:
    arrays = {k: dump[k] for k in ("images", "labels", "k")}
  tmp = os.path.join(out, "best.tmp.npz")
  np.savez(tmp, **arrays, valid_loss=loss, jit=jit, best_iter=step)
  os.replace(tmp, os.path.join(out, "best.npz"))
  return {"best_iter": step, "best_valid_loss": loss}


def main(argv=None) -> None:
  args = parse_args(argv)
  import torch  # noqa: PLC0415

  torch.set_num_threads(args.threads)
  official = import_official(args.rfad_root)
  os.makedirs(args.out, exist_ok=True)
  prepare_mnist(args.mnist_raw, os.path.join(args.cache, "data"))
  here = os.getcwd()
  os.chdir(args.cache)  # get_mnist reads './data/'
  try:
    x_train, y_train, _, _ = official.data.get_mnist(output_channels=1, image_size=28)
  finally:
    os.chdir(here)
  n_classes, n_channels, im_size = 10, 1, 28
  stats = {"mean": float(x_train.mean()), "std": float(x_train.std())}  # after get_mnist: 0, 1

  # run_distillation.py, MNIST branch
  x_init = official.coresets.make_coreset(x_train, y_train, args.ipc, n_classes, args.init,
                                          seed=args.seed)
  np.random.seed(args.seed)  # noqa: NPY002 (as run_distillation.py; the loop draws from it)
  valid_indices = []
  for c in range(n_classes):
    class_indices = np.where(y_train == c)[0]
    # with replacement and from the training images the loop also samples, as the official
    valid_indices.append(class_indices[np.random.choice(len(class_indices),  # noqa: NPY002
                                                        args.val_per_class)])
  valid_indices = np.concatenate(valid_indices)
  x_valid, y_valid = x_train[valid_indices], y_train[valid_indices]
  model_class = functools.partial(official.models.ConvNet_wide, n_channels, net_norm="none",
                                  im_size=(im_size, im_size), k=2, chopped_head=True,
                                  net_width=args.width // 2)
  schedule = [(0, args.num_models, 1)]  # fresh models every step
  random.seed(args.seed)  # the loop's per-step model seed: random.randint, unseeded there

  cpu0, wall0 = time.process_time(), time.perf_counter()
  hooks = Hooks(official, args.steps, cpu0)
  early_stopped = False
  try:
    official.distillation.distill_dataset(
        x_train, y_train, model_class, args.lr, 8, args.n_batches, iters=args.steps + 1,
        ga_steps=1, platt=args.platt, schedule=schedule, save_location=args.out,
        samples_per_class=args.ipc, n_classes=n_classes, learn_labels=bool(args.learn_labels),
        batch_size=args.batch_size, X_valid=x_valid, y_valid=y_valid, n_channels=n_channels,
        im_size=im_size, X_init=x_init, jit=args.jit, seed=args.seed, corruption=0,
        whitening_mat=None, from_loader=False)
    early_stopped = True  # it returned: the official early stopping wrote best.npz itself
  except StopAtStep:
    pass
  cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
  last = int(hooks.log[-1][0])
  record = {
      "side": "official", "commit": git_commit(args.rfad_root), "rfad_root": args.rfad_root,
      "torch": torch.__version__, "settings": vars(args), "train_stats_after_get_mnist": stats,
      "distill_cpu_s": cpu, "validation_cpu_s": hooks.validation_cpu,
      "distill_cpu_s_without_validation": cpu - hooks.validation_cpu, "distill_wall_s": wall,
      "steps_done": last, "early_stopped": early_stopped,
      "validation": {"columns": ["step", "loss", "acc", "loop_cpu_s", "validation_cpu_s"],
                     "rows": hooks.log},
      "final": os.path.join(args.out, f"{last}.npz"), "best": os.path.join(args.out, "best.npz")}
  if not early_stopped:
    record |= write_best(args.out, hooks.log, args.jit)
  write_json(os.path.join(args.out, "official.json"), record)
  print(f"\ndistilled {last} steps: {cpu:.1f} CPU-s ({hooks.validation_cpu:.1f} of them in the "
        f"official validation), {wall:.1f} s wall -> {record['final']}")


if __name__ == "__main__":
  main()
