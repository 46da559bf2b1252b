"""KRR test accuracy of distilled sets under other analytic kernels than the one they were
distilled with, beside a random real subset of the same size (issue 39, part 4: does a KIP set
transfer to another architecture at infinite width?).

  python -m bench.cross_kernel --sets runs/curves/sets/kip-mnist-ipc1-x1.npz \\
      --kernels conv:1,convnet --test-images 1000

Each set is scored with its own labels and with the centred one-hot of their argmax (hard), on a
fixed random draw of `--test-images` test images in the set's own preprocessing; the random row
is one class-balanced draw of real training images (seed 0) with centred one-hot labels. A
kernel is `name` or `name:depth` (fc and conv). Prints a table and writes
bench/results/cross_kernel.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def score(path: str, kernels: list[str], n_test: int, dataset: str, manual_dir: str | None
          ) -> list[dict]:
  import jax.numpy as jnp
  import numpy as np

  from kip.data import centered_one_hot, class_balanced_indices
  from kip.io import load_distilled
  from kip.kernels import make_kernel
  from kip.krr import evaluate
  from kip.pipeline import data_for_set

  distilled = load_distilled(path, dataset)
  data = data_for_set(distilled, dataset, manual_dir=manual_dir)
  rng = np.random.default_rng(0)
  test = rng.choice(len(data.x_test), min(n_test, len(data.x_test)), replace=False)
  classes = data.num_classes
  per_class = len(distilled.images) // classes
  real = class_balanced_indices(data.labels_train, per_class, rng, classes)
  supports = {
      "set": (distilled.images, distilled.labels),
      "set, hard labels": (distilled.images,
                           centered_one_hot(np.argmax(distilled.labels, 1), classes)),
      "random real subset": (data.x_train[real], data.y_train[real])}
  rows = []
  for name in kernels:
    arch, _, depth = name.partition(":")
    kernel = make_kernel(arch, depth=int(depth or 1))
    for row, (x, y) in supports.items():
      start = time.process_time()
      result = evaluate(kernel.kernel_fn, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                        data.x_test[test], data.labels_test[test])
      rows.append({"set": os.path.relpath(path, ROOT), "kernel": name, "row": row,
                   "test_acc": result["test_acc"], "test_images": len(test),
                   "cpu_s": round(time.process_time() - start, 1)})
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.cross_kernel", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sets", required=True, help="comma-separated distilled sets")
  parser.add_argument("--kernels", default="conv:1,convnet")
  parser.add_argument("--test-images", type=int, default=1000)
  parser.add_argument("--dataset", default="mnist")
  parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results",
                                                    "cross_kernel.json"))
  args = parser.parse_args(argv)
  from kip import cli
  from kip.files import write_json

  manual_dir = os.environ.get("KIP_MANUAL_DIR")
  kernels = [k for k in args.kernels.split(",") if k]
  rows = [r for path in args.sets.split(",") if path
          for r in score(path, kernels, args.test_images, args.dataset, manual_dir)]
  write_json(args.out, {"command": "python -m bench.cross_kernel " + " ".join(
      argv if argv is not None else sys.argv[1:]), "machine": cli.describe_devices(),
      "rows": rows})
  print(cli.format_table(("set", "kernel", "support", "KRR test acc (%)", "test images",
                          "CPU s"),
                         [(r["set"], r["kernel"], r["row"], f"{100 * r['test_acc']:.2f}",
                           str(r["test_images"]), f"{r['cpu_s']:.0f}") for r in rows]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
