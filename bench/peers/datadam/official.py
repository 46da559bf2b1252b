"""The official DataDAM code (DataDistillation/DataDAM, `main_DataDAM.py`) on MNIST, run offline on
a CPU.

Runs under the PyTorch virtual environment of bench/peers/README.md (plus `einops`, which the
official `networks` imports), never under the project's Python. It imports the official `utils`
(`get_dataset`, `get_attention`, `DiffAugment`, `ParamDiffAug`, `evaluate_synset`) and `networks`
(`ConvNet`) from a checkout outside this repository (`--datadam-root` or $DATADAM_ROOT) and repeats
the distillation loop of `main_DataDAM.py` for one experiment: a fresh ConvNet per update, its
parameters frozen, in train mode; every class's real batch and synthetic images put through the
same siamese DSA draw; all classes' real images through the network in one forward pass and all
synthetic images in another; the spatial attention (`get_attention(..., param=1, exp=p,
norm="l2")`) of every ReLU output but the last, and the flattened embedding, matched by the
squared distance of per-class means, summed over classes: `100 * attention + 100 * task_balance *
embedding`; SGD on the images (lr 1, momentum 0.5).

What differs from running `main_DataDAM.py`, all of it on purpose and listed in
bench/peers/README.md:
- the network is the official `networks.ConvNet` built here with `--width` and `--norm` (the
  code's `get_network("ConvNet")` is width 128 with batch norm and moves every network to CUDA
  with an unconditional `net.cuda()`, so it cannot be called on a CPU); torch is seeded before
  each draw as `get_network` does, with a seed drawn from a `numpy` Generator seeded by `--seed`
  instead of the wall clock (same range);
- the attention power p is `--power` (the code hard-codes `exp=1`; the paper's table says 4);
- `--iterations N` makes N image updates; `main_DataDAM.py --Iteration N` makes N + 1;
- each class's DSA seed is a draw of the same Generator (the code: `int(time.time() * 1000) %
  100000`, which repeats within a millisecond, so on a fast device all classes of an update
  often share one draw); the global `np.random` that the real batches come from is seeded;
- `--bn-batch class` (not the code: a diagnostic) puts each class through the network on its own,
  so batch norm's statistics are per class, as in this project's `methods/datadam.py`;
- no evaluation during the run (the code evaluates 10 networks every 2,000 updates); with
  `--eval-nets K` the official `evaluate_synset` trains K networks on the set at the end;
- torchvision is imported without its compiled operators and `kornia` (used only for ZCA) is a
  stub; MNIST is read from a local folder, never downloaded.

Writes to `--out`: `images_datadam_official.npy` (N, 1, 28, 28) float32 in DC's normalised space
(mean 0.1307, std 0.3081, as the official code keeps them), `labels_datadam_official.npy` (N,)
int64 class ids (a pair `kip.io.load_distilled` reads), and `official.json`: settings, the commit
of the checkout, the loss (and its two terms) every 100 updates, the images' mean per-image
standard deviation, the distillation's CPU seconds (`time.process_time`, data loading excluded)
and wall seconds, and with `--eval-nets K` the test accuracies of the K networks.

    /work/venvs/torch/bin/python bench/peers/datadam/official.py --ipc 1 --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))  # the repository
from bench.peers.dm.official import git_commit, prepare_mnist, write_json  # noqa: E402

NUM_CLASSES, CHANNEL, IM_SIZE = 10, 1, (28, 28)
NORMS = {"batch": "batchnorm", "instance": "instancenorm"}  # --norm -> the official net_norm


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--datadam-root", default=os.environ.get("DATADAM_ROOT", "/work/peers/DataDAM"),
                 help="checkout of DataDistillation/DataDAM (or $DATADAM_ROOT)")
  p.add_argument("--mnist-raw", default="/work/shared/data/mnist",
                 help="folder with MNIST's four idx .gz files")
  p.add_argument("--cache", default="/work/peers/cache/mnist",
                 help="torchvision root: MNIST/raw/ is filled from --mnist-raw once")
  p.add_argument("--out", default="", help="output folder (needed but for --loss-check)")
  p.add_argument("--ipc", type=int, default=1)
  p.add_argument("--iterations", type=int, default=1000,
                 help="image updates (main_DataDAM.py's --Iteration N makes N + 1)")
  p.add_argument("--batch-real", type=int, default=64,
                 help="real images per class per update (main_DataDAM.py's --batch_real)")
  p.add_argument("--width", type=int, default=128, help="ConvNet width (the code's: 128)")
  p.add_argument("--norm", default="batch", choices=tuple(NORMS),
                 help="ConvNet normalisation (the code's get_network('ConvNet'): batch; the "
                      "paper's table: instance)")
  p.add_argument("--power", type=float, default=1.0,
                 help="p of the attention sum_c |f|^p (the code: 1; the paper's table: 4)")
  p.add_argument("--attention-weight", type=float, default=100.0,
                 help="weight of each layer's attention term (hard-coded 100 in the code)")
  p.add_argument("--task-balance", type=float, default=0.01,
                 help="main_DataDAM.py's --task_balance (lambda): the embedding term is "
                      "weighted 100 x this")
  p.add_argument("--bn-batch", default="all", choices=("all", "class"),
                 help="all: every class's images in one forward pass (the code); class: one "
                      "pass per class (batch-norm statistics per class, as ours; a diagnostic)")
  p.add_argument("--lr-img", type=float, default=1.0)
  p.add_argument("--init", default="real", choices=("real", "noise"))
  p.add_argument("--dsa-strategy", default="color_crop_cutout_flip_scale_rotate")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
  p.add_argument("--log-every", type=int, default=100, help="updates between loss records")
  p.add_argument("--eval-nets", type=int, default=0,
                 help="networks the official evaluate_synset trains on the set (0: none)")
  p.add_argument("--eval-width", type=int, default=128,
                 help="width of the evaluation ConvNet (main_DataDAM.py's eval mode SS: the "
                      "distillation's own ConvNet, width 128)")
  p.add_argument("--eval-norm", default="batch", choices=tuple(NORMS),
                 help="normalisation of the evaluation ConvNet (SS: the code's batch norm)")
  p.add_argument("--eval-epochs", type=int, default=1800,
                 help="main_DataDAM.py's --epoch_eval_train (evaluate_synset runs it + 1)")
  p.add_argument("--eval-batch", type=int, default=64, help="main_DataDAM.py's --batch_train")
  p.add_argument("--eval-only", action="store_true",
                 help="skip distillation; evaluate the pair already in --out (or --support)")
  p.add_argument("--loss-check", default="",
                 help="no distillation: write this .npz (one network's weights, random real and "
                      "synthetic batches, the loss terms for both --bn-batch modes and p = 1, 4) "
                      "for bench/peers/datadam/loss_check.py")
  p.add_argument("--support", default="",
                 help="with --eval-only: an images_*.npy (N, 1, 28, 28 in DC's space) to evaluate; "
                      "its labels_*.npy beside it")
  return p.parse_args(argv)


def import_official(root: str):
  """The official `utils` and `networks` modules, imported from the checkout (torchvision without
  its compiled operators; `kornia`, which only the ZCA option uses, a stub)."""
  for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations",
               "kornia"):
    sys.modules.setdefault(name, types.ModuleType(name))
  if not os.path.exists(os.path.join(root, "main_DataDAM.py")):
    sys.exit(f"{root}: not a DataDAM checkout (no main_DataDAM.py); pass --datadam-root")
  sys.path.insert(0, root)  # the official modules import each other by top-level name
  try:
    return importlib.import_module("utils"), importlib.import_module("networks")
  except ModuleNotFoundError as e:
    sys.exit(f"the official code needs {e.name!r}: /work/venvs/torch/bin/pip install {e.name}")


def draw_network(networks, torch, rng: np.random.Generator, width: int, norm: str):
  """A fresh official ConvNet-3 (ReLU, average pooling; `get_network`'s arguments but width and
  norm), torch seeded first as `get_network` does, the seed drawn from `rng` (same range)."""
  torch.random.manual_seed(int(rng.integers(0, 100000)))
  return networks.ConvNet(channel=CHANNEL, num_classes=NUM_CLASSES, net_width=width, net_depth=3,
                          net_act="relu", net_norm=NORMS[norm], net_pooling="avgpooling",
                          im_size=IM_SIZE)


def relu_outputs(torch, net, x) -> tuple[list, object]:
  """(outputs of every ReLU in `net.features`, in order; the embedding `net(x)[0]`), the ReLU
  outputs caught by forward hooks as main_DataDAM.py's `attach_hooks` does."""
  caught = []
  hooks = [m.register_forward_hook(lambda _m, _i, out: caught.append(out.clone()))
           for m in net.features if isinstance(m, torch.nn.ReLU)]
  try:
    embedding = net(x)[0]
  finally:
    for h in hooks:
      h.remove()
  return caught, embedding


def class_mean_distance(torch, real, syn, classes: int):
  """main_DataDAM.py's `error(..., "MSE_B")`: rows grouped by class (class 0's first, the same
  number per class), the squared distance of each class's mean row, summed over classes and
  features."""
  real = real.reshape(classes, len(real) // classes, -1).mean(1)
  syn = syn.reshape(classes, len(syn) // classes, -1).mean(1)
  return torch.sum((real - syn) ** 2)


def matching_loss(args, utils, torch, net, real_groups, syn_groups):
  """(attention term, embedding term), both summed over classes, for lists of per-class batches:
  one forward pass for all classes (`--bn-batch all`, the code) or one per class."""
  groups = [(real_groups, syn_groups)] if args.bn_batch == "all" else [
      ([r], [s]) for r, s in zip(real_groups, syn_groups, strict=True)]
  attention, embedding = torch.tensor(0.0), torch.tensor(0.0)
  for reals, syns in groups:
    maps_real, out_real = relu_outputs(torch, net, torch.cat(reals, dim=0))
    maps_syn, out_syn = relu_outputs(torch, net, torch.cat(syns, dim=0))
    out_real = out_real.detach()
    classes = len(reals)
    for layer in range(len(maps_real) - 1):  # every ReLU output but the last
      a_real = utils.get_attention(maps_real[layer].detach(), param=1, exp=args.power, norm="l2")
      a_syn = utils.get_attention(maps_syn[layer], param=1, exp=args.power, norm="l2")
      attention = attention + class_mean_distance(torch, a_real, a_syn, classes)
    embedding = embedding + class_mean_distance(torch, out_real, out_syn, classes)
  return attention, embedding


def distill(args, utils, networks, torch, dst_train, rng) -> tuple[np.ndarray, np.ndarray, dict]:
  """main_DataDAM.py's loop for one experiment; returns images, labels and a record."""
  param = utils.ParamDiffAug()
  dsa = args.dsa_strategy not in ("none", "None")
  images_all = torch.cat([torch.unsqueeze(dst_train[i][0], dim=0) for i in range(len(dst_train))])
  labels_all = [dst_train[i][1] for i in range(len(dst_train))]
  indices_class = [[] for _ in range(NUM_CLASSES)]
  for i, lab in enumerate(labels_all):
    indices_class[lab].append(i)

  def get_images(c, n):  # main_DataDAM.py's: the global np.random, seeded in main()
    return images_all[np.random.permutation(indices_class[c])[:n]]  # noqa: NPY002

  image_syn = torch.randn(size=(NUM_CLASSES * args.ipc, CHANNEL, *IM_SIZE), dtype=torch.float,
                          requires_grad=True)
  label_syn = torch.arange(NUM_CLASSES).repeat_interleave(args.ipc)  # [0, 0, ..., 9, 9]
  if args.init == "real":
    for c in range(NUM_CLASSES):
      image_syn.data[c * args.ipc:(c + 1) * args.ipc] = get_images(c, args.ipc).detach().data

  optimizer_img = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5)
  optimizer_img.zero_grad()
  losses = {}
  cpu0, wall0 = time.process_time(), time.perf_counter()
  for it in range(args.iterations):
    net = draw_network(networks, torch, rng, args.width, args.norm)
    net.train()
    for parameter in net.parameters():
      parameter.requires_grad = False
    real_groups, syn_groups = [], []
    for c in range(NUM_CLASSES):
      img_real = get_images(c, args.batch_real)
      img_syn = image_syn[c * args.ipc:(c + 1) * args.ipc]
      if dsa:
        seed = int(rng.integers(0, 100000))  # official: int(time.time() * 1000) % 100000
        img_real = utils.DiffAugment(img_real, args.dsa_strategy, seed=seed, param=param)
        img_syn = utils.DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=param)
      real_groups.append(img_real)
      syn_groups.append(img_syn)
    attention, embedding = matching_loss(args, utils, torch, net, real_groups, syn_groups)
    loss = args.attention_weight * attention + args.attention_weight * args.task_balance * embedding

    optimizer_img.zero_grad()
    loss.backward()
    optimizer_img.step()
    if it % args.log_every == 0 or it == args.iterations - 1:
      # main_DataDAM.py prints loss / num_classes; the two terms here are unweighted sums
      losses[it] = {"loss": loss.item() / NUM_CLASSES, "attention": attention.item(),
                    "embedding": embedding.item()}
      print(f"iter {it:05d} loss {losses[it]['loss']:.4f} cpu {time.process_time() - cpu0:.1f}s",
            flush=True)
  images = image_syn.detach().numpy()
  record = {"distill_cpu_s": time.process_time() - cpu0,
            "distill_wall_s": time.perf_counter() - wall0, "loss": losses,
            "image_std": float(images.reshape(len(images), -1).std(1).mean())}
  return images, label_syn.numpy(), record


def evaluate(args, utils, networks, torch, images, labels, testloader, rng) -> list[float]:
  """Test accuracies of `--eval-nets` networks trained by the official evaluate_synset (SGD lr
  0.01, momentum 0.9, weight decay 5e-4, lr x0.1 after half the epochs, DSA per image)."""
  eval_args = types.SimpleNamespace(
      lr_net=0.01, epoch_eval_train=args.eval_epochs, batch_train=args.eval_batch, device="cpu",
      dsa=args.dsa_strategy not in ("none", "None"), dsa_strategy=args.dsa_strategy,
      dsa_param=utils.ParamDiffAug())
  accs = []
  for k in range(args.eval_nets):
    net = draw_network(networks, torch, rng, args.eval_width, args.eval_norm)
    _, _, acc = utils.evaluate_synset(k, net, torch.tensor(images), torch.tensor(labels),
                                      testloader, eval_args)
    accs.append(float(acc))
  return accs


def loss_check(args, utils, networks, torch, path: str) -> None:
  """Writes `path`: a drawn network's state_dict (`w/<name>`), (10, batch_real, 1, 28, 28) `real`
  and (10, ipc, 1, 28, 28) `syn` N(0, 1) batches shifted and scaled per class, and the official
  attention and embedding terms (`att_<bn_batch>_<power>`, `emb_...`) on them, without DSA."""
  rng = np.random.default_rng(args.seed)
  shape = (1, *IM_SIZE)
  real = [torch.tensor(rng.normal(size=(args.batch_real, *shape)) + 0.3 * c, dtype=torch.float)
          for c in range(NUM_CLASSES)]
  syn = [torch.tensor(rng.normal(size=(args.ipc, *shape)) * (1 + 0.1 * c), dtype=torch.float)
         for c in range(NUM_CLASSES)]
  net = draw_network(networks, torch, rng, args.width, args.norm)
  net.train()
  for parameter in net.parameters():
    parameter.requires_grad = False
  out = {"real": torch.stack(real).numpy(), "syn": torch.stack(syn).numpy()}
  out |= {f"w/{k}": v.numpy() for k, v in net.state_dict().items()}
  for bn_batch in ("all", "class"):
    for power in (1.0, 4.0):
      terms = matching_loss(types.SimpleNamespace(bn_batch=bn_batch, power=power), utils, torch,
                            net, real, syn)
      out[f"att_{bn_batch}_{power:g}"], out[f"emb_{bn_batch}_{power:g}"] = (
          t.item() for t in terms)
  np.savez(path, **out)


def save(path: str, array: np.ndarray) -> None:
  np.save(path + ".tmp.npy", array)
  os.replace(path + ".tmp.npy", path)


def main(argv=None) -> None:
  args = parse_args(argv)
  if not (args.out or args.loss_check):
    sys.exit("pass --out DIR (or --loss-check FILE.npz)")
  import torch  # noqa: PLC0415

  torch.set_num_threads(args.threads)
  prepare_mnist(args.mnist_raw, args.cache)
  utils, networks = import_official(args.datadam_root)
  np.random.seed(args.seed)  # noqa: NPY002 (main_DataDAM.py's get_images draws from the global one)
  torch.manual_seed(args.seed)
  rng = np.random.default_rng(args.seed)
  if args.loss_check:
    loss_check(args, utils, networks, torch, args.loss_check)
    return
  os.makedirs(args.out, exist_ok=True)
  images_path = os.path.join(args.out, "images_datadam_official.npy")
  labels_path = os.path.join(args.out, "labels_datadam_official.npy")
  record_path = os.path.join(args.out, "official.json")

  # get_dataset reads args.zca only (False: no whitening); MNIST comes out in DC's space
  _, _, _, _, _, _, dst_train, _, testloader, _ = utils.get_dataset(
      "MNIST", args.cache, types.SimpleNamespace(zca=False))
  if args.eval_only:
    src = args.support or images_path
    images = np.load(src).astype(np.float32)
    folder, name = os.path.split(src)
    labels = np.load(os.path.join(folder, name.replace("images", "labels")))
    if labels.ndim == 2:  # one-hot or centred one-hot
      labels = labels.argmax(-1)
    accs = evaluate(args, utils, networks, torch, images, labels.astype(np.int64), testloader,
                    np.random.default_rng(args.seed + 1000))
    print(json.dumps({"support": src, "accs": accs}))
    return

  images, labels, record = distill(args, utils, networks, torch, dst_train, rng)
  save(images_path, images.astype(np.float32))
  save(labels_path, labels.astype(np.int64))
  record |= {"side": "official", "commit": git_commit(args.datadam_root),
             "torch": torch.__version__,
             "settings": {k: v for k, v in vars(args).items()
                          if k not in ("eval_only", "support")},
             "images": images_path, "labels": labels_path}
  if args.eval_nets:
    cpu0 = time.process_time()
    record["official_eval_accs"] = evaluate(args, utils, networks, torch, images, labels,
                                            testloader, np.random.default_rng(args.seed + 1000))
    record["official_eval_cpu_s"] = time.process_time() - cpu0
  write_json(record_path, record)
  print(f"distilled {images.shape} in {record['distill_cpu_s']:.1f} CPU-s; {record_path}")


if __name__ == "__main__":
  main()
