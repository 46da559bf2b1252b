"""DataDAM's matching loss, ours against the official code, on one network and fixed batches.

The official side (`official.py --loss-check`, under the PyTorch environment) draws one of its
ConvNets, makes random real and synthetic batches and computes the attention and embedding terms
twice: as `main_DataDAM.py` does (all classes in one forward pass: batch norm's statistics mix the
classes) and with one forward pass per class. Here the same weights go into our network, and our
own `update` (`methods.datadam.make_datadam`, DSA off) is run once on the same batches with its
network draw replaced by those weights; its logged `attention_loss` and `embedding_loss` are
compared with both official variants. The per-class variant must agree to float32 precision
(relative error < 1e-4, else exit 1); the gap to the code's own all-classes variant is what batch
norm's grouping alone changes.

    python bench/peers/datadam/loss_check.py [--ipc 2] [--width 32] [--batch-real 32]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))  # the repository

NUM_CLASSES = 10


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--ipc", type=int, default=2)
  p.add_argument("--width", type=int, default=32)
  p.add_argument("--batch-real", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--torch-python", default="/work/venvs/torch/bin/python")
  p.add_argument("--datadam-root", default=os.environ.get("DATADAM_ROOT", "/work/peers/DataDAM"))
  return p.parse_args(argv)


def our_variables(official: dict, init_variables: dict) -> dict:
  """The official ConvNet-3's state_dict as our `convnet3` variables (OIHW -> HWIO; `features`
  holds conv, norm, ReLU, pool per block)."""
  params = dict(init_variables["params"])
  for block in range(3):
    conv, norm = f"w/features.{4 * block}", f"w/features.{4 * block + 1}"
    params[f"conv_{block}"] = {"kernel": official[f"{conv}.weight"].transpose(2, 3, 1, 0),
                               "bias": official[f"{conv}.bias"]}
    params[f"norm_{block}"] = {"scale": official[f"{norm}.weight"],
                               "bias": official[f"{norm}.bias"]}
  return {"params": params, "batch_stats": init_variables["batch_stats"]}


class FixedDraw:
  """A `kip.nets` model whose `init` returns given variables: our update's fresh network."""

  def __init__(self, model, variables):
    self.model, self.variables = model, variables

  def init(self, *args, **kwargs):
    del args, kwargs
    return self.variables

  def apply(self, *args, **kwargs):
    return self.model.apply(*args, **kwargs)


def our_terms(official: dict, ipc: int, width: int, power: float) -> tuple[float, float]:
  """(attention_loss, embedding_loss) of one step of our DataDAM on the official batches."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  import methods.datadam as datadam  # noqa: PLC0415
  from kip.method import Batch  # noqa: PLC0415

  image_shape = (28, 28, 1)
  real = official["real"].transpose(0, 1, 3, 4, 2)  # (classes, n, 1, H, W) -> NHWC per class
  syn = official["syn"].transpose(0, 1, 3, 4, 2)
  make_net = datadam.make_net

  def fixed_net(*args, **kwargs):
    model = make_net(*args, **kwargs)
    init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False)
    return FixedDraw(model, our_variables(official, init))

  with mock.patch.object(datadam, "make_net", fixed_net):
    method = datadam.make_datadam(num_classes=NUM_CLASSES, image_shape=image_shape, width=width,
                                  depth=3, norm="batch", power=power, augment="",
                                  real_per_class=real.shape[1])
  one_hot = np.eye(NUM_CLASSES, dtype=np.float32)
  y_syn = np.repeat(one_hot, ipc, axis=0)
  y_real = np.repeat(one_hot, real.shape[1], axis=0)
  state = method.init(jax.random.PRNGKey(0), syn.reshape(-1, *image_shape), y_syn)
  _, metrics = method.update(state, Batch(jnp.asarray(real.reshape(-1, *image_shape)),
                                          jnp.asarray(y_real)),
                             jax.random.PRNGKey(1), jnp.asarray(0))
  return float(metrics["attention_loss"]), float(metrics["embedding_loss"])


def main(argv=None) -> None:
  args = parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "official.npz")
    cmd = [args.torch_python, os.path.join(HERE, "official.py"), "--datadam-root",
           args.datadam_root, "--loss-check", path, "--ipc", str(args.ipc), "--width",
           str(args.width), "--batch-real", str(args.batch_real), "--seed", str(args.seed)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
      sys.exit(f"the official side failed: {result.stderr[-1000:]}")
    official = dict(np.load(path))
  from kip.cli import format_table  # noqa: PLC0415

  rows, worst = [], 0.0
  for power in (1.0, 4.0):
    ours = dict(zip(("att", "emb"), our_terms(official, args.ipc, args.width, power),
                    strict=True))
    for term in ("att", "emb"):
      per_class, code = official[f"{term}_class_{power:g}"], official[f"{term}_all_{power:g}"]
      err = abs(ours[term] - per_class) / abs(per_class)
      worst = max(worst, err)
      rows.append((f"{power:g}", {"att": "attention", "emb": "embedding"}[term],
                   f"{ours[term]:.6g}", f"{per_class:.6g}", f"{err:.1e}", f"{code:.6g}"))
  print(format_table(("p", "term", "ours", "official, per class", "rel. error",
                      "official as the code (all classes)"), rows))
  if worst > 1e-4:
    sys.exit(f"ours and the official per-class loss differ (relative error {worst:.1e})")
  print(f"ours = the official per-class loss (worst relative error {worst:.1e})")


if __name__ == "__main__":
  main()
