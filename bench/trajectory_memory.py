"""Memory and time of the trajectory-matching update against the number of student steps, with
and without rematerialisation, compiled as a loop (`lax.scan`) or unrolled.

  python -m bench.trajectory_memory --syn-steps 5,10,20,40

MNIST-shaped data (28x28x1, 10 classes, 10 images per class), ConvNet-3 width 32 with instance
norm (the cpu buffer's experts), DSA per image in the student's steps. Each row reads XLA's own
memory analysis of the compiled gradient of the matching loss (temporary buffers: what the
backward pass through the student's steps holds), then times the update of
`methods.trajectory.make_trajectory_matching`: the first (compiling) one and the median of
`--rounds` more (up to `--timed-max` student steps: compiled as a loop they are slow on CPU).
Unrolled programs compile slower as the student grows; `--unrolled-max` caps the student steps
compiled unrolled. Prints a table and writes bench/results/trajectory_memory.json (rows measured
now replace the same rows of the file; the others are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kip import cli
from kip.augment import DSA_STRATEGY
from kip.nets import make_net
from methods.trajectory import (
  ExpertStore,
  make_student,
  make_trajectory_matching,
  trajectory_loss,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE, CLASSES, IPC = (28, 28, 1), 10, 10


def measure(store, model, params, syn_steps: int, remat: bool, unroll: bool,
            rounds: int, timed: bool = True) -> dict:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(IPC * CLASSES, *SHAPE)).astype(np.float32)
  y = np.eye(CLASSES, dtype=np.float32)[np.arange(IPC * CLASSES) % CLASSES]
  row = {"syn_steps": syn_steps, "remat": remat, "unrolled": unroll,
         "temp_mib": _temp_bytes(model, params, x, y, syn_steps, remat, unroll) / 2**20,
         "first_update_s": None, "update_s": None}
  if not timed:
    return row
  method = make_trajectory_matching(model, params, store, image_shape=SHAPE,
                                    syn_steps=syn_steps, expert_epochs=1, max_start_epoch=1,
                                    augment=DSA_STRATEGY, remat=remat, unroll=unroll)
  state = method.init(None, x, y)
  t0 = time.perf_counter()
  state, _ = method.update(state, None, jax.random.key(0), jnp.asarray(1))
  jax.block_until_ready(state.x)
  row["first_update_s"] = time.perf_counter() - t0
  times = []
  for r in range(rounds):
    t0 = time.perf_counter()
    state, _ = method.update(state, None, jax.random.key(r + 1), jnp.asarray(r + 2))
    jax.block_until_ready(state.x)
    times.append(time.perf_counter() - t0)
  row["update_s"] = statistics.median(times)
  return row


def _temp_bytes(model, params, x, y, syn_steps, remat, unroll) -> float:
  """Temporary bytes of the compiled gradient of the matching loss (the update's heavy part:
  the unrolled student and the backward pass through it), from XLA's memory analysis."""
  theta, unravel = ravel_pytree(params)
  student = make_student(model, unravel, syn_steps=syn_steps, augment=DSA_STRATEGY,
                         remat=remat, unroll=unroll)

  def loss(x, lr):
    return trajectory_loss(student(x, jnp.asarray(y), lr, theta, jax.random.key(0)), theta,
                           theta + 0.01)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  compiled = grad.lower(jnp.asarray(x), jnp.asarray(0.01)).compile()
  return float(compiled.memory_analysis().temp_size_in_bytes)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--syn-steps", default="5,10,20,40")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--unrolled-max", type=int, default=20,
                      help="largest student compiled unrolled (compilation grows with it)")
  parser.add_argument("--timed-max", type=int, default=10,
                      help="largest student whose updates are timed (memory only beyond)")
  args = parser.parse_args(argv)
  model = make_net("convnet3", CLASSES, width=32, norm="instance", image_shape=SHAPE,
                   dc_padding=True)
  params = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)), train=False)["params"]
  flat, _ = ravel_pytree(params)
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    store = ExpertStore.create(folder, {"bench": True}, int(flat.size), 1)
    drift = 0.01 * np.random.default_rng(1).normal(size=flat.shape)
    store.add(0, np.stack([np.asarray(flat), np.asarray(flat) + drift]), {})
    for syn_steps in [int(s) for s in args.syn_steps.split(",")]:
      for remat in (True, False):
        for unroll in (False, True):
          if unroll and syn_steps > args.unrolled_max:
            continue
          row = measure(store, model, params, syn_steps, remat, unroll, args.rounds,
                        timed=syn_steps <= args.timed_max)
          rows.append(row)
          print(json.dumps(row), flush=True)
  print(cli.format_table(
      ("student steps", "remat", "compiled as", "temp memory (MiB)", "first update (s)",
       "update (s)"),
      [(str(r["syn_steps"]), "yes" if r["remat"] else "no",
        "unrolled" if r["unrolled"] else "scan",
        f"{r['temp_mib']:.1f}",
        "-" if r["first_update_s"] is None else f"{r['first_update_s']:.1f}",
        "-" if r["update_s"] is None else f"{r['update_s']:.2f}") for r in rows]))
  out = os.path.join(ROOT, "bench", "results", "trajectory_memory.json")
  if os.path.exists(out):  # rows measured now replace the same rows; the others are kept
    with open(out) as f:
      def key(r):
        return r["syn_steps"], r["remat"], r["unrolled"]
      done = {key(r) for r in rows}
      rows = sorted([r for r in json.load(f)["rows"] if key(r) not in done] + rows, key=key)
  with open(out + ".tmp", "w") as f:
    json.dump({"command": " ".join(["python -m bench.trajectory_memory", *(argv or sys.argv[1:])]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"{jax.default_backend()}", "jax": jax.__version__, "rows": rows},
              f, indent=2)
  os.replace(out + ".tmp", out)
  print(f"written {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
