"""The official DM code (VICO-UoE/DatasetCondensation, `main_DM.py`) on MNIST, run offline on a CPU.

Runs under the PyTorch virtual environment of bench/peers/README.md, never under the project's
Python (the project does not depend on torch). It imports the official `utils` and `networks` from
a checkout outside this repository (`--dc-root` or $DC_ROOT) and repeats the distillation loop of
`main_DM.py` (the ConvNet branch: `'BN' not in args.model`) statement for statement, calling the
official `get_dataset`, `get_network`, `DiffAugment` and `ParamDiffAug`; it leaves out what the
comparison does not use (the evaluations at iterations 0, 2000, ..., the PNG dumps, the five
experiments in one process).

What differs from running `main_DM.py`, all of it on purpose and listed in bench/peers/README.md:
- the network is `get_network(f"ConvNetW{width}")`, the official width ablation's ConvNet (depth 3,
  ReLU, instance norm, average pooling), so the width is a flag (main_DM.py's `--model ConvNet`
  is width 128);
- `--iterations N` makes N image updates; `main_DM.py --Iteration N` makes N + 1
  (`for it in range(args.Iteration+1)` updates at every `it`, the last one included);
- randomness is repeatable: the official code seeds torch from the wall clock in `get_network`
  and draws each DSA seed as `int(time.time() * 1000) % 100000`; here both seeds come from a
  `numpy` Generator seeded by `--seed` (same range), and the global `np.random` that
  `main_DM.py`'s `get_images` uses is seeded by `--seed` too;
- torchvision is imported without its compiled operators (the wheel at hand is a CUDA build whose
  `_C` does not load beside the CPU torch; nothing here uses those operators);
- MNIST is read from a local folder (`--mnist-raw`, extracted once to `--cache`), never downloaded.

Writes to `--out`: `images_dm_official.npy` (N, 1, 28, 28) float32 in DC's normalised space
(mean 0.1307, std 0.3081, as the official code keeps them), `labels_dm_official.npy` (N,) int64
class ids (a pair `kip.io.load_distilled` reads), and `official.json`: settings, the commit of the
checkout, the loss every 100 updates, the distillation's CPU seconds (`time.process_time`, data
loading excluded) and wall seconds, and with `--eval-nets K` the test accuracies of K networks
trained on the set by the official `evaluate_synset` (its defaults: SGD lr 0.01, momentum 0.9,
weight decay 5e-4, 1000 epochs, lr x0.1 after half, batch 256, DSA).

    /work/venvs/torch/bin/python bench/peers/dm/official.py --ipc 1 --seed 0 --out runs/peers/dm/x
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
import types

import numpy as np

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--dc-root", default=os.environ.get("DC_ROOT", "/work/peers/DatasetCondensation"),
                 help="checkout of VICO-UoE/DatasetCondensation (or $DC_ROOT)")
  p.add_argument("--mnist-raw", default="/work/shared/data/mnist",
                 help="folder with MNIST's four idx .gz files")
  p.add_argument("--cache", default="/work/peers/cache/mnist",
                 help="torchvision root: MNIST/raw/ is filled from --mnist-raw once")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--ipc", type=int, default=1)
  p.add_argument("--iterations", type=int, default=1000,
                 help="image updates (main_DM.py's --Iteration N makes N + 1)")
  p.add_argument("--batch-real", type=int, default=64, help="real images per class per update")
  p.add_argument("--width", type=int, default=32, choices=(32, 64, 128, 256),
                 help="ConvNet width: the official ConvNetW<width>")
  p.add_argument("--lr-img", type=float, default=1.0)
  p.add_argument("--init", default="real", choices=("real", "noise"))
  p.add_argument("--dsa-strategy", default="color_crop_cutout_flip_scale_rotate")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
  p.add_argument("--eval-nets", type=int, default=0,
                 help="networks the official evaluate_synset trains on the set (0: none)")
  p.add_argument("--eval-model", default="ConvNet",
                 help="official model name of the evaluation network (ConvNet: width 128)")
  p.add_argument("--eval-epochs", type=int, default=1000, help="main_DM.py's --epoch_eval_train")
  p.add_argument("--eval-only", action="store_true",
                 help="skip distillation; evaluate the pair already in --out (or --support)")
  p.add_argument("--support", default="",
                 help="with --eval-only: an images_*.npy (N, 1, 28, 28 in DC's space) to evaluate; "
                      "its labels_*.npy beside it")
  return p.parse_args(argv)


def prepare_mnist(raw: str, cache: str) -> None:
  """Extracts the idx files to cache/MNIST/raw, where torchvision's MNIST looks (no download)."""
  folder = os.path.join(cache, "MNIST", "raw")
  os.makedirs(folder, exist_ok=True)
  for name in MNIST_FILES:
    target = os.path.join(folder, name)
    if os.path.exists(target):
      continue
    source = os.path.join(raw, name + ".gz")
    with gzip.open(source, "rb") as src, open(target + ".tmp", "wb") as dst:
      shutil.copyfileobj(src, dst)
    os.replace(target + ".tmp", target)


def import_official(dc_root: str):
  """The official `utils` module, imported from the checkout (torchvision without its _C ops)."""
  for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(name, types.ModuleType(name))
  if not os.path.exists(os.path.join(dc_root, "main_DM.py")):
    sys.exit(f"{dc_root}: not a DatasetCondensation checkout (no main_DM.py); pass --dc-root")
  sys.path.insert(0, dc_root)  # the official modules import each other by top-level name
  return importlib.import_module("utils")


class SeededClock:
  """Stands in for the `time` module inside the official `utils` while a network is drawn:
  `get_network` seeds torch with `int(time.time() * 1000) % 100000`; this clock makes that seed a
  draw of `rng` (same range)."""

  def __init__(self, rng: np.random.Generator):
    self.rng = rng

  def time(self) -> float:
    return (int(self.rng.integers(0, 100000)) + 0.5) / 1000

  def __getattr__(self, name):
    return getattr(time, name)


@contextlib.contextmanager
def seeded_clock(utils, rng):
  real = utils.time
  utils.time = SeededClock(rng)
  try:
    yield
  finally:
    utils.time = real


def git_commit(dc_root: str) -> str:
  marker = os.path.join(dc_root, "COMMIT")
  if os.path.exists(marker):
    return open(marker).read().strip()
  try:
    return subprocess.run(["git", "-C", dc_root, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def distill(args, utils, torch, dst_train, rng) -> tuple[np.ndarray, np.ndarray, dict]:
  """main_DM.py's loop for one experiment (ConvNet branch); returns images, labels, record."""
  channel, im_size, num_classes = 1, (28, 28), 10
  device = "cpu"
  param = utils.ParamDiffAug()
  dsa = args.dsa_strategy not in ("none", "None")
  model = f"ConvNetW{args.width}"

  # main_DM.py: organise the real dataset
  images_all = [torch.unsqueeze(dst_train[i][0], dim=0) for i in range(len(dst_train))]
  labels_all = [dst_train[i][1] for i in range(len(dst_train))]
  indices_class = [[] for _ in range(num_classes)]
  for i, lab in enumerate(labels_all):
    indices_class[lab].append(i)
  images_all = torch.cat(images_all, dim=0).to(device)

  def get_images(c, n):  # main_DM.py's: global np.random, seeded in main()
    idx_shuffle = np.random.permutation(indices_class[c])[:n]  # noqa: NPY002 (as main_DM.py)
    return images_all[idx_shuffle]

  image_syn = torch.randn(size=(num_classes * args.ipc, channel, im_size[0], im_size[1]),
                          dtype=torch.float, requires_grad=True, device=device)
  label_syn = torch.tensor(np.array([np.ones(args.ipc) * i for i in range(num_classes)]),
                           dtype=torch.long, requires_grad=False, device=device).view(-1)
  if args.init == "real":
    for c in range(num_classes):
      image_syn.data[c * args.ipc:(c + 1) * args.ipc] = get_images(c, args.ipc).detach().data

  optimizer_img = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5)
  optimizer_img.zero_grad()
  losses = {}
  cpu0, wall0 = time.process_time(), time.perf_counter()
  for it in range(args.iterations):
    with seeded_clock(utils, rng):
      net = utils.get_network(model, channel, num_classes, im_size).to(device)
    net.train()
    for parameter in list(net.parameters()):
      parameter.requires_grad = False
    embed = net.embed

    loss = torch.tensor(0.0).to(device)
    for c in range(num_classes):
      img_real = get_images(c, args.batch_real)
      img_syn = image_syn[c * args.ipc:(c + 1) * args.ipc].reshape(
          (args.ipc, channel, im_size[0], im_size[1]))
      if dsa:
        seed = int(rng.integers(0, 100000))  # official: int(time.time() * 1000) % 100000
        img_real = utils.DiffAugment(img_real, args.dsa_strategy, seed=seed, param=param)
        img_syn = utils.DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=param)
      output_real = embed(img_real).detach()
      output_syn = embed(img_syn)
      loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)

    optimizer_img.zero_grad()
    loss.backward()
    optimizer_img.step()
    if it % 100 == 0 or it == args.iterations - 1:
      losses[it] = loss.item() / num_classes  # main_DM.py prints loss / num_classes
      print(f"iter {it:05d} loss {losses[it]:.4f} cpu {time.process_time() - cpu0:.1f}s",
            flush=True)
  record = {"distill_cpu_s": time.process_time() - cpu0,
            "distill_wall_s": time.perf_counter() - wall0, "loss": losses}
  return image_syn.detach().cpu().numpy(), label_syn.cpu().numpy(), record


def evaluate(args, utils, torch, images, labels, testloader, rng) -> list[float]:
  """Test accuracies of `--eval-nets` networks trained by the official evaluate_synset."""
  eval_args = types.SimpleNamespace(
      lr_net=0.01, epoch_eval_train=args.eval_epochs, batch_train=256, device="cpu",
      dsa=args.dsa_strategy not in ("none", "None"), dsa_strategy=args.dsa_strategy,
      dsa_param=utils.ParamDiffAug(), dc_aug_param=None)
  accs = []
  for k in range(args.eval_nets):
    with seeded_clock(utils, rng):
      net = utils.get_network(args.eval_model, 1, 10, (28, 28))
    _, _, acc = utils.evaluate_synset(k, net, torch.tensor(images), torch.tensor(labels),
                                      testloader, eval_args)
    accs.append(float(acc))
  return accs


def write_json(path: str, obj: dict) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


def main(argv=None) -> None:
  args = parse_args(argv)
  import torch  # noqa: PLC0415

  torch.set_num_threads(args.threads)
  prepare_mnist(args.mnist_raw, args.cache)
  utils = import_official(args.dc_root)
  np.random.seed(args.seed)  # noqa: NPY002 (main_DM.py's get_images draws from the global one)
  torch.manual_seed(args.seed)
  rng = np.random.default_rng(args.seed)
  os.makedirs(args.out, exist_ok=True)
  images_path = os.path.join(args.out, "images_dm_official.npy")
  labels_path = os.path.join(args.out, "labels_dm_official.npy")
  record_path = os.path.join(args.out, "official.json")

  _, _, _, _, _, _, dst_train, _, testloader = utils.get_dataset("MNIST", args.cache)
  if args.eval_only:
    src = args.support or images_path
    images = np.load(src).astype(np.float32)
    folder, name = os.path.split(src)
    labels = np.load(os.path.join(folder, name.replace("images", "labels")))
    if labels.ndim == 2:  # one-hot or centred one-hot
      labels = labels.argmax(-1)
    accs = evaluate(args, utils, torch, images, labels.astype(np.int64), testloader,
                    np.random.default_rng(args.seed + 1000))
    print(json.dumps({"support": src, "accs": accs}))
    return

  images, labels, record = distill(args, utils, torch, dst_train, rng)
  np.save(images_path + ".tmp.npy", images.astype(np.float32))
  os.replace(images_path + ".tmp.npy", images_path)
  np.save(labels_path + ".tmp.npy", labels.astype(np.int64))
  os.replace(labels_path + ".tmp.npy", labels_path)
  record |= {"side": "official", "commit": git_commit(args.dc_root), "torch": torch.__version__,
             "settings": {k: v for k, v in vars(args).items()
                          if k not in ("eval_only", "support")},
             "images": images_path, "labels": labels_path}
  if args.eval_nets:
    cpu0 = time.process_time()
    record["official_eval_accs"] = evaluate(args, utils, torch, images, labels, testloader,
                                            np.random.default_rng(args.seed + 1000))
    record["official_eval_cpu_s"] = time.process_time() - cpu0
  write_json(record_path, record)
  print(f"distilled {images.shape} in {record['distill_cpu_s']:.1f} CPU-s; {record_path}")


if __name__ == "__main__":
  main()
