"""The official FRePo code (yongchaoz/FRePo, `script/distill.py`) on MNIST, run offline on a CPU.

Runs under the FRePo virtual environment of bench/peers/frepo/README.md (the project's jax, flax,
optax and TensorFlow, plus what FRePo imports), never under the project's Python. It imports the
official `lib` package from a checkout outside this repository (`--frepo-root` or $FREPO_ROOT,
with `frepo_compat.patch` applied) and repeats the set-up of `script/distill.py:main` for MNIST
statement for statement (`get_dataset`, `init_proto`, the centred one-hot targets,
`configure_dataloader`, `create_model('conv', ...)`, `create_train_state`, `ProtoHolder`), then
calls the official `proto_train_and_evaluate` and `save_proto_np` unchanged.

What differs from running `script/distill.py`, on purpose (listed in bench/peers/frepo/README.md):
- the real batch (`config.kernel.batch_size`, 1024 in `get_config`) is a flag;
- the evaluation of 5 fresh networks inside the loop (`proto_eval`, at steps 1, 3,000, 10,000,
  ...) is replaced by a stub that returns 0 unless `--loop-eval`: the sets are evaluated
  afterwards by this project's evaluator; PNG dumps are off (`image_saver=None`);
- the global `np.random`, from which the loop draws the next pool model unseeded, is seeded by
  `--seed`; TensorFlow's shuffle of the real batches keeps its official fixed seed 0;
- MNIST is read from a prepared tfds folder (`--data-path`), never downloaded.

Writes to `--out`: `np/step<steps>.npz` (the official `save_proto_np`: `image` (N, 28, 28, 1)
standardised with mean 0.1307 / std 0.3081, `label` (N, 10) learned labels), the official logs and
checkpoints under `log/`, and `official.json`: settings, the loop's CPU seconds
(`time.process_time`, all threads of the process, compilation included, data loading excluded)
and wall seconds, and the official training metrics the loop logged (`log/**/events*`).

    /work/venvs/frepo/bin/python bench/peers/frepo/official.py --ipc 1 --steps 2000 --out DIR
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys
import time

COMMIT = "43e028a5839a5de367701b9e9544a08ffccb3166"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--frepo-root", default=os.environ.get("FREPO_ROOT", "/work/peers/FRePo"),
                 help="patched checkout of yongchaoz/FRePo (or $FREPO_ROOT)")
  p.add_argument("--data-path", default="/work/main/.cache/tfds",
                 help="tfds data_dir holding a prepared mnist/3.0.1")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion_mnist"))
  p.add_argument("--ipc", type=int, default=1, help="num_prototypes_per_class")
  p.add_argument("--steps", type=int, default=2000, help="num_train_steps")
  p.add_argument("--width", type=int, default=32, help="first block's width (w, 2w, 4w)")
  p.add_argument("--depth", type=int, default=3)
  p.add_argument("--normalization", default="batch",
                 help="pool nets' norm during distillation (README: batch)")
  p.add_argument("--batch-size", type=int, default=256, help="config.kernel.batch_size")
  p.add_argument("--num-nn-state", type=int, default=10, help="pool size")
  p.add_argument("--max-online-updates", type=int, default=100)
  p.add_argument("--learn-label", type=int, default=1, choices=(0, 1))
  p.add_argument("--seed", type=int, default=0, help="random_seed")
  p.add_argument("--loop-eval", action="store_true",
                 help="keep the official evaluation of 5 fresh nets at steps 1, 3000, 10000, ...")
  return p.parse_args(argv)


def import_official(root: str):
  """The official modules, imported from the checkout at `root` (its `lib` package)."""
  if not os.path.isdir(os.path.join(root, "lib", "datadistillation")):
    sys.exit(f"no FRePo checkout at {root}; see bench/peers/frepo/README.md")
  sys.path.insert(0, root)  # the official code is a top-level `lib` package, not installed
  from lib.datadistillation import frepo
  from lib.datadistillation.utils import save_proto_np
  from lib.dataset import augmax, dataloader
  from lib.models.utils import create_model
  from lib.training.utils import create_train_state
  sys.path.remove(root)
  return frepo, save_proto_np, augmax, dataloader, create_model, create_train_state


def training_metrics(logdir: str) -> dict[str, list]:
  """The scalars the official loop wrote (tensorboard event files) as {tag: [[step, value]]}."""
  from tensorboard.backend.event_processing import event_accumulator

  out: dict[str, list] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "**", "events.out.*"), recursive=True)):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    for tag in acc.Tags().get("tensors", []):
      import tensorflow as tf

      out[tag] = [[e.step, float(tf.make_ndarray(e.tensor_proto))] for e in acc.Tensors(tag)]
  return out


def main(argv=None) -> None:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  import jax
  import numpy as np
  import tensorflow as tf
  from absl import logging
  from clu import metric_writers

  tf.config.experimental.set_visible_devices([], "GPU")
  logging.set_verbosity("info")
  frepo, save_proto_np, augmax, dataloader, create_model, create_train_state = import_official(
      args.frepo_root)
  # script/distill.py's get_config(), with the flags of its main() and the batch as a flag.
  sys.path.insert(0, args.frepo_root)
  from script.distill import get_config
  sys.path.remove(args.frepo_root)
  config = get_config()
  config.random_seed = args.seed
  config.kernel.batch_size = args.batch_size
  config.dataset.data_path = args.data_path
  config.dataset.zca_path = os.path.join(args.out, "zca")  # unused by MNIST (no ZCA)
  config.dataset.name = args.dataset
  (ds_train, ds_test), _, _, _ = dataloader.get_dataset(config.dataset)
  num_classes = config.dataset.num_classes
  num_prototypes = args.ipc * num_classes
  config.kernel.num_prototypes = num_prototypes
  config.online.arch = "conv"
  config.online.width = args.width
  config.online.depth = args.depth
  config.online.normalization = args.normalization
  config.online.img_size = config.dataset.img_shape[0]
  config.online.img_channels = config.dataset.img_shape[-1]
  steps_per_epoch = config.dataset.train_size // config.kernel.batch_size
  workdir = os.path.join(args.out, "log")
  writer = metric_writers.create_default_writer(logdir=workdir)

  aug_strategy = "color_crop_rotate_translate_cutout"  # mnist / fashion_mnist: no flips
  use_flip, num_online_eval_updates = False, 1000
  has_bn = args.normalization == "batch"
  eval_normalization = "identity" if has_bn else args.normalization
  x_proto, y_proto = frepo.init_proto(ds_train, args.ipc, num_classes=num_classes,
                                      seed=args.seed, scale_y=True)
  diff_aug = augmax.get_aug_by_name(aug_strategy, res=config.dataset.img_shape[0])

  def y_transform(y):  # centred one-hot targets, as script/distill.py
    return tf.one_hot(y, num_classes, on_value=1 - 1 / num_classes, off_value=-1 / num_classes)

  ds_train = dataloader.configure_dataloader(ds_train, batch_size=config.kernel.batch_size,
                                             y_transform=y_transform, train=True, shuffle=True)
  ds_test = dataloader.configure_dataloader(ds_test, batch_size=config.kernel.eval_batch_size,
                                            y_transform=y_transform, train=False, shuffle=False)
  online_model = create_model("conv", num_classes, width=args.width, depth=args.depth,
                              normalization=args.normalization, output=config.online.output)
  eval_model = create_model("conv", num_classes, width=args.width, depth=args.depth,
                            normalization=eval_normalization, output=config.online.output)
  create_online_state = functools.partial(
      create_train_state, config=config.online, model=online_model,
      learning_rate_fn=lambda x: config.online.learning_rate, has_bn=has_bn)
  create_eval_state = functools.partial(
      create_train_state, config=config.online, model=eval_model,
      learning_rate_fn=lambda x: config.online.learning_rate, has_bn=False)
  ph = frepo.ProtoHolder(x_proto, y_proto, num_prototypes, learn_label=bool(args.learn_label))

  if not args.loop_eval:
    frepo.proto_eval = lambda *a, **k: 0.0  # stub: the sets are evaluated by our evaluator
  # The loop draws the next pool model with the global np.random.randint, unseeded there.
  np.random.seed(args.seed)  # noqa: NPY002
  cpu0, wall0 = time.process_time(), time.perf_counter()
  state = frepo.proto_train_and_evaluate(
      config.kernel, ph, create_online_state, create_eval_state, (ds_train, ds_test), workdir,
      seed=args.seed, num_nn_state=args.num_nn_state,
      num_online_eval_updates=num_online_eval_updates, num_train_steps=args.steps,
      diff_aug=diff_aug, use_flip=use_flip, max_online_updates=args.max_online_updates,
      steps_per_epoch=steps_per_epoch, steps_per_log=500, steps_per_eval=10000,
      steps_per_checkpoint=1000, save_ckpt=args.steps, steps_per_save_image=args.steps // 10,
      has_bn=has_bn, use_pmap=False, writer=writer, image_saver=None)
  jax.block_until_ready(state.params)
  cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
  save_proto_np(state, step=args.steps, image_dir=args.out, use_pmap=False)
  writer.flush()
  record = {
      "side": "official", "commit": COMMIT, "frepo_root": args.frepo_root,
      "jax": jax.__version__, "settings": vars(args) | {
          "aug_strategy_eval": aug_strategy, "eval_normalization": eval_normalization,
          "kernel_optimizer": config.kernel.optimizer, "kernel_lr": config.kernel.learning_rate,
          "online_optimizer": config.online.optimizer, "online_lr": config.online.learning_rate,
          "online_batch": config.kernel.eval_batch_size},
      "distill_cpu_s": cpu, "distill_wall_s": wall,
      "support": os.path.join(args.out, "np", f"step{str(args.steps).zfill(6)}.npz"),
      "metrics": training_metrics(workdir)}
  tmp = os.path.join(args.out, "official.json.tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, os.path.join(args.out, "official.json"))
  print(f"distilled {args.steps} steps: {cpu:.1f} CPU-s, {wall:.1f} s wall -> {record['support']}")


if __name__ == "__main__":
  main()
