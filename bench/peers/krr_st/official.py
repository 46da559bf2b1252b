"""The official KRR-ST code (db-Lee/selfsup_dd, `train.py`) on MNIST or Fashion-MNIST, run offline
on a CPU.

Runs under the PyTorch virtual environment of bench/peers/README.md (plus `kornia==0.7.1`, the
version the repository pins, for its `K.RandomCrop` / `K.Normalize`), never under the project's
Python. It imports the official `model_pool` (`ModelPool`), `algorithms/distill.py` (one outer
step), `utils` (`InfIterator`, `Logger`) and `models/wrapper.py` (`get_model`) from a checkout
outside this repository (`--root` or $SELFSUP_DD_ROOT; no patch is needed), and repeats
`train.py:main` statement by statement: the seeds, the shuffled real loader and its
`InfIterator`, the initial support (the first `--size` images of the loader, raw, and the
teacher's representations of them normalised), AdamW with `LinearLR` to 1e-3x, the pool of
`convnet_<w>_<2w>_<4w>_bn` models warmed up by `ModelPool.init`, the official `Logger`, and the
loop calling `distill.run` unchanged.

What differs from running `train.py`, on purpose (bench/peers/krr_st/README.md lists each):
- the teacher is ours (`experiments.teacher`, converted by convert.py and checked here against
  our features), run by `TorchTeacher`: `train.py` loads a torchvision ResNet-18 checkpoint from
  `./teacher_ckpt/`, which exists only for the paper's datasets and whose training code is not
  in the repository;
- the data are MNIST / Fashion-MNIST tensors in [0, 1] read from the idx files (`train.py` reads
  `./datasets/<name>/X_tr_<size>.pth` through `get_loader`, for 3-channel datasets only), and
  the augmentation is `get_aug`'s SVHN branch (random crop, padding 4, no flip: digits) with the
  teacher's standardisation for `K.Normalize` (`MEAN` / `STD` have no 28-pixel entry); `--flip`
  takes the branch of every other dataset;
- the sizes are flags (`train.py` fixes them per dataset: 1,000 images, width 128, 1,024 real
  images, 160,000 steps, 1,000 online updates for CIFAR-100);
- no evaluation in the loop (`train.py` pre-trains and linear-probes every 16,000 steps and at
  the last one): the sets are evaluated afterwards (compare.py: ours; official_eval.py: the
  official `pretrain_krr_st` + `finetune` / `linear_eval`);
- options for the ablation sides, all off by default: `--reset` (restart a re-initialised pool
  model's counter, as the paper describes; the official `ModelPool.update` never does),
  `--first-padding 3` (pad 28x28 inputs by 3 in the first conv, as our `krr_st_convnet`),
  `--syn-init normalised` (start the support from standardised images, as ours; the official
  starts it from the raw [0, 1] images while the real batches are standardised).

Writes to `--out`: `distilled.npz` (our format: `images` (N, 28, 28, 1) as the official `x_syn`,
`targets` (N, D) = `y_syn`, with `dataset`, `method`, `size`, `seed`, `teacher`, `config` and the
images' preprocessing: none (mean 0, std 1) for raw-initialised sets, the teacher's
standardisation otherwise), the official `x_syn.pt` / `y_syn.pt` (the `Logger`'s), and
`official.json`: settings, commit, the teacher check, the pool warm-up's CPU seconds, the loop's
CPU and wall seconds (`time.process_time`, data loading excluded), the mean outer loss every
`--print-every` steps with the loop's CPU seconds there.

    /work/venvs/torch/bin/python bench/peers/krr_st/official.py --teacher-npz T.npz --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))
sys.path.insert(0, REPO)  # run as a script: the shared helpers (numpy only, no jax)
from bench.peers.common import write_json  # noqa: E402
from bench.peers.dm.official import git_commit, prepare_mnist  # noqa: E402

DATASETS = ("mnist", "fashion_mnist")
TEACHER_TOLERANCE = 1e-4  # relative Frobenius error of the teacher's features, torch vs ours


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--root", default=os.environ.get("SELFSUP_DD_ROOT", "/work/peers/selfsup_dd"),
                 help="checkout of db-Lee/selfsup_dd (or $SELFSUP_DD_ROOT)")
  p.add_argument("--dataset", default="mnist", choices=DATASETS, help="source (distilled) data")
  p.add_argument("--manual-dir", default="/work/shared/data",
                 help="folder with <dataset>/ holding the four idx .gz files")
  p.add_argument("--cache", default="/work/peers/cache/krr_st",
                 help="the idx files are extracted once to <cache>/<dataset>/MNIST/raw")
  p.add_argument("--teacher-npz", required=True, help="our teacher, exported by convert.py")
  p.add_argument("--out", required=True, help="output folder (the official save_dir/exp_name)")
  p.add_argument("--size", type=int, default=100, help="num_images (official CIFAR-100: 1000)")
  p.add_argument("--steps", type=int, default=2000,
                 help="--outer_iteration (official 160,000)")
  p.add_argument("--width", type=int, default=32,
                 help="train_model convnet_<w>_<2w>_<4w>_bn (official CIFAR-100: w = 128)")
  p.add_argument("--batch", type=int, default=256,
                 help="--outer_batch_size, real images per step (official 1024)")
  p.add_argument("--num-models", type=int, default=10, help="--num_models")
  p.add_argument("--max-online-updates", type=int, default=100,
                 help="--online_iteration (official 1000)")
  p.add_argument("--online-lr", type=float, default=0.1, help="--online_lr")
  p.add_argument("--online-wd", type=float, default=1e-3, help="--online_wd")
  p.add_argument("--lr", type=float, default=1e-3, help="--outer_lr (AdamW)")
  p.add_argument("--outer-wd", type=float, default=0.0, help="--outer_wd")
  p.add_argument("--flip", action="store_true",
                 help="random horizontal flips of the real batch (get_aug's branch for every "
                      "dataset but SVHN; off: the SVHN branch, as ours for digits)")
  p.add_argument("--reset", action="store_true",
                 help="ablation: restart a re-initialised pool model's counter (the paper)")
  p.add_argument("--first-padding", type=int, default=1, choices=(1, 3),
                 help="ablation: padding of the pool ConvNets' first conv (3: ours on 28x28)")
  p.add_argument("--syn-init", default="raw", choices=("raw", "normalised"),
                 help="ablation: the support starts from raw [0, 1] images (official) or "
                      "standardised ones (ours)")
  p.add_argument("--seed", type=int, default=0, help="--seed")
  p.add_argument("--print-every", type=int, default=100, help="--print_every")
  p.add_argument("--save-every", type=int, default=2000, help="--save_every")
  p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
  args = p.parse_args(argv)
  if args.max_online_updates < 2:
    p.error("--max-online-updates must be at least 2 (ModelPool.init draws "
            "np.random.randint(1, online_iteration))")
  return args


def import_official(root: str) -> types.SimpleNamespace:
  """The official modules, imported from the checkout (torchvision without its _C ops). Only the
  modules the distillation and the evaluation use: `algorithms/wrapper.py` would import all the
  algorithms, and `pretrain_frepo` needs `transformers`."""
  for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(name, types.ModuleType(name))
  if not os.path.exists(os.path.join(root, "model_pool.py")):
    sys.exit(f"{root}: not a selfsup_dd checkout (no model_pool.py); pass --root")
  sys.path.insert(0, root)  # the official modules import each other by top-level name
  import algorithms.distill  # noqa: PLC0415
  import algorithms.finetune  # noqa: PLC0415
  import algorithms.linear_eval  # noqa: PLC0415
  import algorithms.pretrain_krr_st  # noqa: PLC0415
  import model_pool  # noqa: PLC0415
  import models.wrapper  # noqa: PLC0415
  import utils  # noqa: PLC0415
  sys.path.remove(root)
  return types.SimpleNamespace(distill=algorithms.distill, finetune=algorithms.finetune,
                               linear_eval=algorithms.linear_eval,
                               pretrain_krr_st=algorithms.pretrain_krr_st,
                               model_pool=model_pool, get_model=models.wrapper.get_model,
                               utils=utils)


def load_split(dataset: str, manual_dir: str, cache: str, train: bool):
  """(x (n, 1, 28, 28) float32 in [0, 1], y (n,) int64) torch tensors of a split, from the idx
  files (extracted once by bench/peers/dm/official.py `prepare_mnist`; Fashion-MNIST's files
  have MNIST's names)."""
  import torch  # noqa: PLC0415
  from torchvision.datasets.mnist import read_image_file, read_label_file  # noqa: PLC0415

  folder = os.path.join(cache, dataset)
  prepare_mnist(os.path.join(manual_dir, dataset), folder)
  raw = os.path.join(folder, "MNIST", "raw")
  prefix = "train" if train else "t10k"
  x = read_image_file(os.path.join(raw, f"{prefix}-images-idx3-ubyte"))
  y = read_label_file(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"))
  return x.unsqueeze(1).to(torch.float32) / 255.0, y.to(torch.int64)


def augmentations(mean, std, flip: bool):
  """`data/augmentation.py get_aug(aug=True)` for one-channel 28x28 images: (transform_tr,
  transform_te). transform_tr: the SVHN branch (K.RandomCrop padding 4, K.Normalize), or with
  `flip` the other datasets' (K.RandomHorizontalFlip(p=0.5) after the crop)."""
  import kornia.augmentation as K  # noqa: PLC0415
  from torch import nn  # noqa: PLC0415

  mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
  size = 28
  if flip:
    transform_tr = nn.Sequential(K.RandomCrop(size=(size, size), padding=4),
                                 K.RandomHorizontalFlip(p=0.5), K.Normalize(mean, std))
  else:
    transform_tr = nn.Sequential(K.RandomCrop(size=(size, size), padding=4),
                                 K.Normalize(mean, std))
  return transform_tr, K.Normalize(mean, std)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """XLA's "SAME" padding of one axis (more at the end when the total is odd)."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def make_teacher(path: str):
  """Our teacher's backbone (kip.nets.ResNet18: 3x3 stem, stages of two basic blocks at
  w x (1, 2, 4, 8), batch norm in inference mode, global average pooling) as a torch module whose
  forward maps (n, C, H, W) standardised images to (n, D) representations; weights from
  convert.py's npz. Convolutions pad as XLA's SAME (asymmetric at stride 2), not torchvision's
  padding 1. Returns (module, npz arrays)."""
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415

  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  params = {k[len("param/"):]: torch.from_numpy(v) for k, v in arrays.items()
            if k.startswith("param/")}
  stats = {k[len("stat/"):]: torch.from_numpy(v) for k, v in arrays.items()
           if k.startswith("stat/")}

  def conv(x, name, stride):
    w = params[f"{name}/kernel"]
    k = w.shape[-1]
    top, bottom = _same_padding(x.shape[2], k, stride)
    left, right = _same_padding(x.shape[3], k, stride)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), w, stride=stride)

  def norm(x, name):
    return F.batch_norm(x, stats[f"{name}/mean"], stats[f"{name}/var"], params[f"{name}/scale"],
                        params[f"{name}/bias"], training=False, momentum=0.0, eps=1e-5)

  class TorchTeacher(torch.nn.Module):
    """Our ResNet-18 teacher backbone, functional over the converted tensors."""

    def forward(self, x):
      h = F.relu(norm(conv(x, "stem", 1), "norm_stem"))
      for stage in range(4):
        for block in range(2):
          name, stride = f"stage{stage}_block{block}", 2 if stage > 0 and block == 0 else 1
          y = F.relu(norm(conv(h, f"{name}/conv_a", stride), f"{name}/norm_a"))
          y = norm(conv(y, f"{name}/conv_b", 1), f"{name}/norm_b")
          if f"{name}/shortcut/kernel" in params:
            h = norm(conv(h, f"{name}/shortcut", stride), f"{name}/norm_shortcut")
          h = F.relu(h + y)
      return h.mean(dim=(2, 3))

  return TorchTeacher(), arrays


def check_teacher(teacher, arrays) -> float:
  """Relative Frobenius error of the torch teacher's features of convert.py's check images
  against ours; exits above TEACHER_TOLERANCE."""
  import torch  # noqa: PLC0415

  with torch.no_grad():
    got = teacher(torch.from_numpy(arrays["check_images"])).numpy()
  want = arrays["check_features"]
  error = float(np.linalg.norm(got - want) / np.linalg.norm(want))
  print(f"teacher in torch vs ours: relative error {error:.2e} on {len(want)} test images",
        flush=True)
  if not error <= TEACHER_TOLERANCE:
    sys.exit(f"the converted teacher differs from ours (relative error {error:.2e} > "
             f"{TEACHER_TOLERANCE}); re-export it with convert.py")
  return error


def _pool_options(args, pool) -> None:
  """The ablation options on a constructed `ModelPool` (nothing with the defaults)."""
  if args.first_padding != 1:
    make = pool.model_func

    def padded(model):
      model.layers[0].block[0].padding = (args.first_padding,) * 2
      return model

    pool.model_func = lambda _: padded(make(_))
    for model in pool.models:
      padded(model)
  if args.reset:
    update = pool.update

    def update_with_reset(idx, x_syn, y_syn):
      due = pool.iterations[idx] >= pool.online_iteration
      update(idx, x_syn, y_syn)
      if due:  # the paper's pool: a re-initialised model starts counting again
        pool.iterations[idx] = 0

    pool.update = update_with_reset


def save_set(path: str, x_syn, y_syn, meta: dict, pre_mean, pre_std) -> None:
  """`distilled.npz` in our format (kip.io), written atomically."""
  arrays = {"images": x_syn.detach().permute(0, 2, 3, 1).numpy().astype(np.float32),
            "targets": y_syn.detach().numpy().astype(np.float32),
            "preprocessing": np.asarray("standardize"),
            "pre_mean": np.asarray(pre_mean, np.float64),
            "pre_std": np.asarray(pre_std, np.float64)}
  for key, value in meta.items():
    arrays[key] = np.asarray(json.dumps(value) if isinstance(value, dict) else value)
  tmp = path[:-len(".npz")] + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def main(argv=None) -> None:
  args = parse_args(argv)
  import torch  # noqa: PLC0415

  torch.set_num_threads(args.threads)
  official = import_official(args.root)
  os.makedirs(args.out, exist_ok=True)
  teacher, teacher_arrays = make_teacher(args.teacher_npz)
  teacher_error = check_teacher(teacher, teacher_arrays)
  mean, std = teacher_arrays["mean"], teacher_arrays["std"]
  x_train, y_train = load_split(args.dataset, args.manual_dir, args.cache, train=True)

  # train.py:main
  device = torch.device("cpu")
  random.seed(args.seed)
  np.random.seed(args.seed)  # noqa: NPY002 (as train.py; ModelPool and distill.run draw from it)
  torch.manual_seed(args.seed)
  # the official argument namespace, with the attributes ModelPool and distill.run read
  oargs = argparse.Namespace(
      seed=args.seed, num_models=args.num_models, online_opt="sgd",
      online_iteration=args.max_online_updates, online_lr=args.online_lr,
      online_wd=args.online_wd, outer_opt="adam", outer_iteration=args.steps,
      outer_batch_size=args.batch, outer_lr=args.lr, outer_wd=args.outer_wd,
      outer_grad_norm=0.0, num_images=args.size,
      train_model=f"convnet_{args.width}_{2 * args.width}_{4 * args.width}_bn",
      img_shape=(1, 28, 28) if args.first_padding == 1 else (1, 32, 32))
  # get_loader(..., aug=False): TensorDataset + shuffled DataLoader
  dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train),
                                   batch_size=args.batch, num_workers=0, shuffle=True,
                                   pin_memory=True)
  iter_tr = official.utils.InfIterator(dl)
  aug_tr, aug_te = augmentations(mean, std, args.flip)

  target_model = teacher.to(device)
  target_model.eval()
  with torch.no_grad():
    x_syn, y_syn = torch.FloatTensor([]), torch.FloatTensor([])
    while x_syn.shape[0] < args.size:
      x, _ = next(iter_tr)
      # train.py keeps the images as loaded (raw); the ablation keeps them standardised
      x_syn = torch.cat([x_syn, x if args.syn_init == "raw" else aug_te(x)], dim=0)
      x = x.to(device)
      x = aug_te(x)
      y = target_model(x).cpu()
      torch.cuda.empty_cache()  # as train.py (nothing on a CPU)
      y_syn = torch.cat([y_syn, y], dim=0)
  oargs.num_pretrain_classes = y_syn.shape[-1]
  x_syn, y_syn = x_syn[:args.size].to(device), y_syn[:args.size].to(device)
  x_syn.requires_grad_(True)
  y_syn.requires_grad_(True)
  outer_opt = torch.optim.AdamW([x_syn, y_syn], lr=args.lr, weight_decay=args.outer_wd)
  outer_sch = torch.optim.lr_scheduler.LinearLR(outer_opt, start_factor=1.0, end_factor=1e-3,
                                                total_iters=args.steps)

  model_pool = official.model_pool.ModelPool(oargs, device)
  _pool_options(args, model_pool)
  cpu0, wall0 = time.process_time(), time.perf_counter()
  model_pool.init(x_syn.detach(), y_syn.detach())
  warm_cpu = time.process_time() - cpu0
  warm_counts = list(model_pool.iterations)

  logger = official.utils.Logger(save_dir=args.out, save_only_last=True,
                                 print_every=args.print_every, save_every=args.save_every,
                                 total_step=args.steps, print_to_stdout=True)
  logger.register_object_to_save(x_syn, "x_syn")
  logger.register_object_to_save(y_syn, "y_syn")
  logger.start()
  loop_cpu0, loop_wall0 = time.process_time(), time.perf_counter()
  losses, rows = [], []
  for outer_step in range(1, args.steps + 1):
    loss = official.distill.run(oargs, device, target_model, model_pool, outer_opt, iter_tr,
                                aug_tr, x_syn, y_syn)
    logger.meter("meta_train", "mse loss", loss)
    losses.append(loss.item())
    if not np.isfinite(losses[-1]):
      sys.exit(f"the outer loss is {losses[-1]} at step {outer_step}; stopped")
    # (train.py evaluates here every --eval_every steps and at the last: not run, see above)
    outer_sch.step()
    logger.step()
    if outer_step % args.print_every == 0 or outer_step == args.steps:
      rows.append([outer_step, float(np.mean(losses[-args.print_every:])),
                   time.process_time() - loop_cpu0, time.perf_counter() - loop_wall0])
  logger.finish()
  loop_cpu, loop_wall = time.process_time() - loop_cpu0, time.perf_counter() - loop_wall0

  settings = vars(args) | {"train_model": oargs.train_model, "img_shape": oargs.img_shape}
  commit = git_commit(args.root)
  raw = args.syn_init == "raw"
  meta = {"dataset": args.dataset, "method": "krr_st_official", "size": args.size,
          "seed": args.seed, "teacher": str(teacher_arrays["source"]),
          "config": settings | {"commit": commit}}
  save_set(os.path.join(args.out, "distilled.npz"), x_syn, y_syn, meta,
           np.zeros_like(mean) if raw else mean, np.ones_like(std) if raw else std)
  expired = sum(c >= args.max_online_updates for c in model_pool.iterations)
  record = {
      "side": "official", "commit": commit, "root": args.root, "torch": torch.__version__,
      "settings": settings, "teacher_npz": args.teacher_npz,
      "teacher_relative_error": teacher_error, "pool_warmup_counts": warm_counts,
      "pool_counts_final": list(model_pool.iterations), "pool_expired_final": expired / len(
          model_pool.iterations), "pool_warmup_cpu_s": warm_cpu, "distill_cpu_s": loop_cpu,
      "distill_wall_s": loop_wall, "total_wall_s": time.perf_counter() - wall0,
      "final_lr": outer_sch.get_last_lr()[0],
      "loss_log": {"columns": ["step", "mean_loss_since_last_row", "loop_cpu_s", "loop_wall_s"],
                   "rows": rows},
      "set": os.path.join(args.out, "distilled.npz")}
  write_json(os.path.join(args.out, "official.json"), record)
  print(f"\ndistilled {args.steps} steps: {loop_cpu:.1f} CPU-s in the loop (+{warm_cpu:.1f} "
        f"warming the pool), {loop_wall:.1f} s wall; pool models expired at the end: "
        f"{expired}/{len(model_pool.iterations)} -> {record['set']}")


if __name__ == "__main__":
  main()
