"""Training throughput of the finite networks, and what vmapping seeds buys.

For each network: images/s of one training step (batch 100 real MNIST images, the `kip` protocol's
SGD step, or the `dc` protocol's with DSA augmentation) for one seed, and for k seeds trained in
one step, either `vmap`ped (one batched program) or sequentially (the single-seed program once per
seed, results stacked: `kip.train.over_seeds`); each speed-up is against k separate single-seed
steps, k x time(1 seed) / time(k).
Steady state only: compilation is excluded, and each figure is the median of --rounds timings of
--steps steps.

  python -m bench.transfer                      # table + bench/results/transfer_throughput.json
  python -m bench.transfer --nets mlp --seeds 2 --steps 5 --rounds 2   # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

from kip.data import centered_one_hot, fit_preprocessor, load_dataset
from kip.io import write_json
from kip.nets import count_params
from kip.train import init_states, make_optimizer, make_train_step, resolve_schedule
from methods.nets import make_net
from methods.protocols import PROTOCOLS

# (label, net, width, norm, protocol)
CASES = {
    "convnet-64": ("convnet", 64, "none", "kip"),
    "convnet-128": ("convnet", 128, "none", "kip"),
    "convnet3-dc-128": ("convnet3", 128, "instance", "dc"),
    "mlp-1024": ("mlp", 1024, "none", "kip"),
    "resnet18-16": ("resnet18", 16, "batch", "dc"),
}


def time_steps(step_fn, states, keys, x, y, steps: int, rounds: int) -> float:
  """Median seconds per step over `rounds` timings of `steps` steps (after one warm-up)."""
  states, loss = step_fn(states, keys, 0, x, y)
  loss.block_until_ready()
  timings = []
  step = 1
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      states, loss = step_fn(states, keys, step, x, y)
      step += 1
    loss.block_until_ready()
    timings.append((time.perf_counter() - t0) / steps)
  return statistics.median(timings)


def measure(label: str, x: np.ndarray, y: np.ndarray, seeds: int, steps: int,
            rounds: int) -> dict:
  name, width, norm, protocol_name = CASES[label]
  protocol = PROTOCOLS[protocol_name]
  net = make_net(name, 10, width=width, norm=norm, image_shape=x.shape[1:],
                 dc_padding=protocol.dc_padding)
  schedule = resolve_schedule(protocol, len(x), steps=10_000)
  tx = make_optimizer(protocol, 0.01, schedule.steps)
  labels = y if protocol.loss == "mse" else y.argmax(1).astype(np.int32)
  x_dev, y_dev = jax.numpy.asarray(x), jax.numpy.asarray(labels)
  per_step = {}
  params = None
  for k, mode in ((1, "vmap"), (seeds, "vmap"), (seeds, "sequential")):
    step_fn = make_train_step(net, tx, protocol.loss, schedule, len(x), seed_batching=mode)
    states = init_states(net, tx, list(range(k)), x.shape[1:])
    params = params or count_params(jax.tree_util.tree_map(lambda a: a[0], states.params))
    keys = jax.numpy.stack([jax.random.key(s) for s in range(k)])
    per_step[k, mode] = time_steps(step_fn, states, keys, x_dev, y_dev, steps, rounds)
  batch = schedule.batch_size
  return {
      "net": label, "protocol": protocol_name, "augment": schedule.augment, "params": params,
      "batch": batch, "seeds": seeds,
      "one_seed_step_s": per_step[1, "vmap"],
      "k_seeds_vmap_step_s": per_step[seeds, "vmap"],
      "k_seeds_sequential_step_s": per_step[seeds, "sequential"],
      "one_seed_images_per_s": batch / per_step[1, "vmap"],
      "k_seeds_vmap_images_per_s": seeds * batch / per_step[seeds, "vmap"],
      "k_seeds_sequential_images_per_s": seeds * batch / per_step[seeds, "sequential"],
      "speedup_vmap": seeds * per_step[1, "vmap"] / per_step[seeds, "vmap"],
      "speedup_sequential": seeds * per_step[1, "vmap"] / per_step[seeds, "sequential"],
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--nets", default=",".join(CASES), help="comma-separated: " +
                      ", ".join(CASES))
  parser.add_argument("--seeds", type=int, default=5, help="k, the seeds trained at once")
  parser.add_argument("--steps", type=int, default=10, help="steps per timing")
  parser.add_argument("--rounds", type=int, default=3, help="timings per figure (median)")
  parser.add_argument("--manual-dir", default=os.environ.get("KIP_MANUAL_DIR", ""))
  parser.add_argument("--data-dir", default=os.environ.get("KIP_DATA_DIR", ""))
  parser.add_argument("--out", default="bench/results/transfer_throughput.json")
  args = parser.parse_args(argv)
  labels = [n.strip() for n in args.nets.split(",") if n.strip()]
  unknown = [n for n in labels if n not in CASES]
  if unknown:
    parser.error(f"unknown nets {unknown}; choose from {list(CASES)}")

  splits = load_dataset("mnist", data_dir=args.data_dir or None,
                        manual_dir=args.manual_dir or None)
  train = splits["train"]
  x = fit_preprocessor(train.images).apply(train.images[:100])
  y = centered_one_hot(train.labels[:100], 10)
  rows = []
  header = (f"{'net':<16} {'protocol':<9} {'params':>10} {'1 seed img/s':>13} "
            f"{'vmap img/s':>11} {'speed-up':>9} {'seq. img/s':>11} {'speed-up':>9}")
  print(header)
  print("-" * len(header))
  for label in labels:
    row = measure(label, x, y, args.seeds, args.steps, args.rounds)
    rows.append(row)
    print(f"{label:<16} {row['protocol'] + ('+dsa' if row['augment'] else ''):<9} "
          f"{row['params']:>10,} {row['one_seed_images_per_s']:>13.0f} "
          f"{row['k_seeds_vmap_images_per_s']:>11.0f} {row['speedup_vmap']:>8.2f}x "
          f"{row['k_seeds_sequential_images_per_s']:>11.0f} {row['speedup_sequential']:>8.2f}x",
          flush=True)
  devices = jax.devices()
  report = {
      "command": "python -m bench.transfer " + " ".join(sys.argv[1:] if argv is None else argv),
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "devices": [str(d) for d in devices], "device_kind": devices[0].device_kind,
                  "jax": jax.__version__},
      "rows": rows,
  }
  write_json(args.out, report)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
