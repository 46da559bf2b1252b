"""The official MTT code (GeorgeCazenavette/mtt-distillation: `buffer.py`, `distill.py`) on MNIST,
run offline on a CPU.

Runs under the PyTorch virtual environment of bench/peers/README.md, never under the project's
Python (the project does not depend on torch). It imports the official `utils`, `networks` and
`reparam_module` from a checkout outside this repository (`--mtt-root` or $MTT_ROOT, with
torch2-compat.patch applied) and repeats the loops of `buffer.py` (the experts) and `distill.py`
(the distillation) statement for statement, calling the official `get_network`, `epoch`,
`DiffAugment`, `ParamDiffAug`, `ReparamModule` and `evaluate_synset`. Subcommands:

- `buffer`: trains `--experts` experts as `buffer.py` does and writes each, as it finishes, to
  `--out/replay_buffer_<i>.pt` (the official format: a list of experts, each a list over epochs
  0..E of the network's parameter tensors in `parameters()` order; one expert per file is what
  `buffer.py --save_interval 1` writes), and `buffer.json` (settings, per-expert test accuracies,
  CPU seconds of training and of the per-epoch test passes). Finished experts are kept: the
  command resumes.
- `distill`: `distill.py`'s loop on the experts of `--buffer`; writes `images_mtt_official.npy`
  (N, 1, 28, 28) float32 in DC's normalised space, `labels_mtt_official.npy` (N,) int64 and
  `lr_mtt_official.npy` () float32, the learned learning rate (a pair `kip.io.load_distilled`
  reads, lr included), and `official.json` (settings, commit, the loss and the learned lr of every
  iteration, the loop's CPU seconds after every iteration and its wall seconds).
- `evaluate`: the official `evaluate_synset` (DSA, SGD momentum 0.9, weight decay 5e-4, lr x0.1
  after half, batch 256) at the set's learned lr on an images/labels(/lr) `.npy` pair; prints one
  JSON line.
- `import-buffer`: writes the experts of an `.npz` (`trajectories`: (experts, epochs + 1, P) flat
  parameter vectors in the official `parameters()` order, what bench/peers/mtt/convert.py makes
  of our expert store) as `replay_buffer_<i>.pt`.
- `logits`: the logits of the official network with one expert's parameters after one epoch on
  the first `--n` test images, with those images (`.npz`): convert.py checks its layout
  conversion against them.

What differs from running `buffer.py` and `distill.py`, all of it on purpose and listed in
bench/peers/README.md:
- MNIST: the official `get_dataset` has no MNIST branch (it exits: "unknown dataset"); `mnist()`
  here is DC's (VICO-UoE/DatasetCondensation), from which MTT's `utils.py` is adapted:
  `ToTensor` + `Normalize(0.1307, 0.3081)`, read from a local folder, never downloaded; the test
  loader has no worker processes (the official 2 would escape the CPU timing).
- experts' snapshots: `buffer.py` keeps `[p.detach().cpu() for p in net.parameters()]`; on a CPU
  `.cpu()` returns the parameter itself, which SGD then updates in place, so every epoch of a
  trajectory would hold the final parameters (start = target, a 0/0 loss in `distill.py`). Here
  `.clone()` is added: a copy, as `.cpu()` makes on the authors' GPU.
- experts are written one per file as they finish (`buffer.py` writes every `--save_interval`
  experts, default 10, and never writes a last, incomplete group: with 4 experts, nothing);
- randomness is repeatable: the official code seeds torch from the wall clock in `get_network`
  (every expert, every distillation iteration); here that seed is a draw of a `numpy` Generator
  seeded by `--seed` (same range, see bench/peers/dm/official.py: `seeded_clock`), and the global
  `np.random` (real images, start epochs), `random` (order of the experts) and torch are seeded by
  `--seed`;
- `distill --iterations N` makes N updates (`distill.py --Iteration N` makes N + 1); no
  evaluation, image dumps or wandb logging inside the loop (`wandb` and `kornia` are stubbed:
  only the logging and ZCA, which MNIST does not use, call them);
- torchvision is imported without its compiled operators (a CUDA build that does not load beside
  the CPU torch; nothing here uses them).

    /work/venvs/torch/bin/python bench/peers/mtt/official.py buffer --experts 4 --epochs 6 \
        --out runs/peers/mtt/experts/official
    /work/venvs/torch/bin/python bench/peers/mtt/official.py distill \
        --buffer runs/peers/mtt/experts/official --ipc 1 --seed 0 --out runs/peers/mtt/x
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import random
import sys
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))  # the repository
from bench.peers.common import write_json  # noqa: E402
from bench.peers.dm.official import git_commit, prepare_mnist, seeded_clock  # noqa: E402

CHANNEL, IM_SIZE, NUM_CLASSES = 1, (28, 28), 10
DC_MEAN, DC_STD = 0.1307, 0.3081
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
# buffer flags that do not change the experts (paths, threads, how many, test passes)
NOT_THE_EXPERTS = ("mtt_root", "mnist_raw", "cache", "threads", "out", "experts",
                   "test_every_epoch")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  common = argparse.ArgumentParser(add_help=False,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  common.add_argument("--mtt-root",
                      default=os.environ.get("MTT_ROOT", "/work/peers/mtt-distillation"),
                      help="checkout of GeorgeCazenavette/mtt-distillation (or $MTT_ROOT)")
  common.add_argument("--mnist-raw", default="/work/shared/data/mnist",
                      help="folder with MNIST's four idx .gz files")
  common.add_argument("--cache", default="/work/peers/cache/mnist",
                      help="torchvision root: MNIST/raw/ is filled from --mnist-raw once")
  common.add_argument("--width", type=int, default=32, choices=(32, 64, 128, 256),
                      help="ConvNet width: the official ConvNetW<width>")
  common.add_argument("--seed", type=int, default=0)
  common.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
  sub = p.add_subparsers(dest="command", required=True)

  b = sub.add_parser("buffer", parents=[common], help="train experts as buffer.py does",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  b.add_argument("--out", required=True, help="folder of the replay_buffer_<i>.pt files")
  b.add_argument("--experts", type=int, default=4, help="buffer.py's --num_experts")
  b.add_argument("--epochs", type=int, default=6, help="buffer.py's --train_epochs")
  b.add_argument("--lr-teacher", type=float, default=0.01)
  b.add_argument("--mom", type=float, default=0.0, help="SGD momentum")
  b.add_argument("--l2", type=float, default=0.0, help="weight decay")
  b.add_argument("--batch-train", type=int, default=256)
  b.add_argument("--dsa-strategy", default=DSA_STRATEGY)
  b.add_argument("--test-every-epoch", action=argparse.BooleanOptionalAction, default=True,
                 help="a test pass after every epoch, as buffer.py (off: after the last only)")
  b.add_argument("--train-size", type=int, default=0,
                 help="train on a class-balanced random subset of this many images (0: all; "
                      "for smoke tests)")

  d = sub.add_parser("distill", parents=[common], help="distill.py's loop",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  d.add_argument("--buffer", required=True, help="folder of replay_buffer_<n>.pt files")
  d.add_argument("--out", required=True, help="output folder")
  d.add_argument("--ipc", type=int, default=1)
  d.add_argument("--iterations", type=int, default=300,
                 help="image updates (distill.py's --Iteration N makes N + 1)")
  d.add_argument("--syn-steps", type=int, default=10)
  d.add_argument("--expert-epochs", type=int, default=2)
  d.add_argument("--max-start-epoch", type=int, default=4)
  d.add_argument("--batch-syn", type=int, default=0, help="0: all images (distill.py's None)")
  d.add_argument("--lr-img", type=float, default=100.0)
  d.add_argument("--lr-lr", type=float, default=1e-5)
  d.add_argument("--lr-teacher", type=float, default=0.01,
                 help="the student's initial lr (distill.py's --lr_init is never read)")
  d.add_argument("--pix-init", default="real", choices=("real", "noise"))
  d.add_argument("--dsa-strategy", default=DSA_STRATEGY)

  e = sub.add_parser("evaluate", parents=[common], help="the official evaluate_synset",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  e.add_argument("--support", required=True,
                 help="an images_*.npy (N, 1, 28, 28) in DC's space; labels_*.npy and (if "
                      "present) lr_*.npy beside it")
  e.add_argument("--nets", type=int, default=1, help="networks trained on the set")
  e.add_argument("--lr", type=float, default=0.0,
                 help="learning rate (0: the set's learned one, lr_*.npy beside it, else 0.01)")
  e.add_argument("--eval-epochs", type=int, default=1000, help="distill.py's --epoch_eval_train")
  e.add_argument("--dsa-strategy", default=DSA_STRATEGY)

  i = sub.add_parser("import-buffer", parents=[common], help="an .npz of flat trajectories "
                     "(official parameter order) -> replay_buffer_<i>.pt",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  i.add_argument("--npz", required=True)
  i.add_argument("--out", required=True)

  g = sub.add_parser("logits", parents=[common], help="logits of one expert on test images",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  g.add_argument("--buffer", required=True)
  g.add_argument("--expert", type=int, default=0, help="index over the files' experts, in order")
  g.add_argument("--epoch", type=int, default=-1, help="which snapshot (-1: the last)")
  g.add_argument("--n", type=int, default=64, help="test images")
  g.add_argument("--out", required=True, help=".npz with images (n, 1, 28, 28) and logits")
  return p.parse_args(argv)


def import_official(mtt_root: str):
  """The official `utils` and `reparam_module`, imported from the checkout (torchvision without
  its _C operators; `wandb` and `kornia` stubbed: logging and ZCA only)."""
  for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations",
               "kornia", "wandb"):
    sys.modules.setdefault(name, types.ModuleType(name))
  if not os.path.exists(os.path.join(mtt_root, "distill.py")):
    sys.exit(f"{mtt_root}: not an mtt-distillation checkout (no distill.py); pass --mtt-root")
  sys.path.insert(0, mtt_root)  # the official modules import each other by top-level name
  return importlib.import_module("utils"), importlib.import_module("reparam_module")


def mnist(utils, torch, cache: str):
  """DC's MNIST branch of `get_dataset` (MTT's has none): (dst_train, dst_test, testloader)."""
  transform = utils.transforms.Compose([utils.transforms.ToTensor(),
                                        utils.transforms.Normalize(mean=[DC_MEAN], std=[DC_STD])])
  dst_train = utils.datasets.MNIST(cache, train=True, download=True, transform=transform)
  dst_test = utils.datasets.MNIST(cache, train=False, download=True, transform=transform)
  testloader = torch.utils.data.DataLoader(dst_test, batch_size=128, shuffle=False, num_workers=0)
  return dst_train, dst_test, testloader


def organise(torch, dst_train, indices=None):
  """buffer.py / distill.py's "organize the real dataset": all images as one tensor, labels,
  and the indices of each class (`indices`: a subset of the training split, for smoke tests)."""
  indices = range(len(dst_train)) if indices is None else indices
  samples = [dst_train[int(i)] for i in indices]
  images_all = torch.cat([torch.unsqueeze(s[0], dim=0) for s in samples], dim=0).to("cpu")
  labels = [int(s[1]) for s in samples]
  indices_class = [[] for _ in range(NUM_CLASSES)]
  for i, lab in enumerate(labels):
    indices_class[lab].append(i)
  return images_all, torch.tensor(labels, dtype=torch.long, device="cpu"), indices_class


def model_name(width: int) -> str:
  return f"ConvNetW{width}"


def expert_files(folder: str) -> list[str]:
  """replay_buffer_0.pt, replay_buffer_1.pt, ... up to the first missing (as distill.py)."""
  files, n = [], 0
  while os.path.exists(os.path.join(folder, f"replay_buffer_{n}.pt")):
    files.append(os.path.join(folder, f"replay_buffer_{n}.pt"))
    n += 1
  return files


def save_torch(torch, obj, path: str) -> None:
  torch.save(obj, path + ".tmp")
  os.replace(path + ".tmp", path)


def save_npy(path: str, array: np.ndarray) -> None:
  np.save(path + ".tmp.npy", array)
  os.replace(path + ".tmp.npy", path)


def sgd_trainer(args, utils, torch):
  """buffer.py's optimiser, `build_buffer`'s default trainer: plain SGD (--lr-teacher, --mom,
  --l2) stepped by the official `epoch`. trainer(net, eargs, criterion, trainloader) ->
  train(loader) -> (loss, accuracy) of one epoch on `loader`."""

  def trainer(teacher_net, eargs, criterion, trainloader):
    del trainloader
    lr = args.lr_teacher
    teacher_optim = torch.optim.SGD(teacher_net.parameters(), lr=lr, momentum=args.mom,
                                    weight_decay=args.l2)
    teacher_optim.zero_grad()
    return lambda loader: utils.epoch("train", dataloader=loader, net=teacher_net,
                                      optimizer=teacher_optim, criterion=criterion, args=eargs,
                                      aug=True)

  return trainer


def test_pass(utils, net, testloader, criterion, eargs):
  """buffer.py's test pass, `build_buffer`'s default tester: (loss, accuracy)."""
  return utils.epoch("test", dataloader=testloader, net=net, optimizer=None, criterion=criterion,
                     args=eargs, aug=False)


def build_buffer(args, utils, torch, *, trainer=None, tester=None, curriculum=None,
                 subset: np.ndarray | None = None, checkout: str | None = None,
                 ignore: tuple[str, ...] = ()) -> None:
  """buffer.py's loop, one expert per file, skipping the experts already written.

  The DATM and PAD runners (bench/peers/datm, bench/peers/pad) reuse it for their buffer scripts,
  which are buffer.py with other parts: `trainer` (see `sgd_trainer`, the default) replaces the
  optimiser, `tester(utils, net, testloader, criterion, eargs)` the test pass (`test_pass`),
  `curriculum(labels (n,) int64) -> (epoch -> (m,) indices)` trains each epoch on those of the
  organised training images (a fresh shuffled loader per epoch; default: all, one loader);
  `subset` (m,) the indices of the training split to organise, in that order (default: all, or
  --train-size's draw); `checkout` is the official code's folder for the record's commit
  (default --mtt-root), `ignore` flags beyond NOT_THE_EXPERTS that do not change the experts."""
  trainer = trainer or sgd_trainer(args, utils, torch)
  tester = tester or test_pass
  dst_train, _, testloader = mnist(utils, torch, args.cache)
  if subset is None and args.train_size:
    labels = np.asarray(dst_train.targets)
    rng = np.random.default_rng([args.seed, 7])
    per_class = args.train_size // NUM_CLASSES
    subset = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class,
                                                replace=False) for c in range(NUM_CLASSES)]))
  images_all, labels_all, _ = organise(torch, dst_train, subset)
  criterion = torch.nn.CrossEntropyLoss()
  dst = utils.TensorDataset(copy.deepcopy(images_all.detach()),
                            copy.deepcopy(labels_all.detach()))
  trainloader = torch.utils.data.DataLoader(dst, batch_size=args.batch_train, shuffle=True,
                                            num_workers=0)
  eargs = types.SimpleNamespace(
      dsa=args.dsa_strategy not in ("none", "None"), dsa_strategy=args.dsa_strategy,
      dsa_param=utils.ParamDiffAug(), device="cpu", dataset="MNIST")
  # buffer.py: DC's augmentation when DSA is off (never here: the comparison uses DSA)
  eargs.dc_aug_param = utils.get_daparam("MNIST", "ConvNet", "ConvNet", None)
  eargs.dc_aug_param["strategy"] = "crop_scale_rotate"
  os.makedirs(args.out, exist_ok=True)
  record_path = os.path.join(args.out, "buffer.json")
  settings = {k: v for k, v in vars(args).items() if k != "command"}
  record = {"side": "official", "experts": {}, "settings": settings}
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
    differ = [k for k in settings if k not in NOT_THE_EXPERTS + tuple(ignore)
              and record["settings"].get(k) != settings[k]]
    if differ:
      sys.exit(f"{args.out} holds experts made with other settings ({', '.join(differ)}); "
               "use another --out")
  record |= {"commit": git_commit(checkout or args.mtt_root), "torch": torch.__version__,
             "settings": settings, "train_images": len(images_all)}
  plan = curriculum(labels_all.numpy()) if curriculum else None
  for it in range(args.experts):
    path = os.path.join(args.out, f"replay_buffer_{it}.pt")
    if os.path.exists(path) and str(it) in record["experts"]:
      continue
    with seeded_clock(utils, np.random.default_rng([args.seed, it])):
      teacher_net = utils.get_network(model_name(args.width), CHANNEL, NUM_CLASSES, IM_SIZE)
    teacher_net.train()
    train = trainer(teacher_net, eargs, criterion, trainloader)
    # .clone(): on a CPU .cpu() is the parameter itself (see the module docstring)
    timestamps = [[p.detach().cpu().clone() for p in teacher_net.parameters()]]
    train_cpu = test_cpu = 0.0
    wall0 = time.perf_counter()
    test_accs, epoch_images = {}, []
    for e in range(args.epochs):
      cpu0 = time.process_time()
      loader = trainloader
      if plan is not None:  # this epoch's images (PAD's buffer_CL.py), in a fresh loader
        idx = torch.as_tensor(plan(e))
        epoch_images.append(len(idx))
        loader = torch.utils.data.DataLoader(
            utils.TensorDataset(copy.deepcopy(images_all[idx].detach()),
                                copy.deepcopy(labels_all[idx].detach())),
            batch_size=args.batch_train, shuffle=True, num_workers=0)
      train_loss, train_acc = train(loader)
      train_cpu += time.process_time() - cpu0
      if args.test_every_epoch or e == args.epochs - 1:
        cpu0 = time.process_time()
        _, test_acc = tester(utils, teacher_net, testloader, criterion, eargs)
        test_cpu += time.process_time() - cpu0
        test_accs[e] = float(test_acc)
        print(f"Itr: {it}\tEpoch: {e}\tTrain Acc: {train_acc}\tTest Acc: {test_acc}", flush=True)
      timestamps.append([p.detach().cpu().clone() for p in teacher_net.parameters()])
    save_torch(torch, [timestamps], path)
    record["experts"][str(it)] = {
        "file": os.path.basename(path), "train_cpu_s": train_cpu, "test_cpu_s": test_cpu,
        "wall_s": time.perf_counter() - wall0, "test_acc": test_accs,
        "final_test_acc": test_accs[args.epochs - 1], "final_train_loss": float(train_loss)}
    if plan is not None:
      record["experts"][str(it)]["epoch_images"] = epoch_images
    write_json(record_path, record)
    print(f"expert {it}: {100 * test_accs[args.epochs - 1]:.2f}% test accuracy, "
          f"{train_cpu:.0f} CPU-s of training, {test_cpu:.0f} of testing", flush=True)
  record["done"] = True
  write_json(record_path, record)


def distill(args, utils, reparam_module, torch) -> None:
  """distill.py's loop (no texture, no ZCA, one process) on the experts in `--buffer`."""
  dst_train, _, _ = mnist(utils, torch, args.cache)
  images_all, _, indices_class = organise(torch, dst_train)
  rng = np.random.default_rng(args.seed)

  def get_images(c, n):  # distill.py's: global np.random, seeded in main()
    idx_shuffle = np.random.permutation(indices_class[c])[:n]  # noqa: NPY002 (as distill.py)
    return images_all[idx_shuffle]

  ipc = args.ipc
  label_syn = torch.tensor(np.array([np.ones(ipc, dtype=np.int_) * i for i in range(NUM_CLASSES)]),
                           dtype=torch.long, requires_grad=False).view(-1)
  image_syn = torch.randn(size=(NUM_CLASSES * ipc, CHANNEL, *IM_SIZE), dtype=torch.float)
  syn_lr = torch.tensor(args.lr_teacher)
  if args.pix_init == "real":
    for c in range(NUM_CLASSES):
      image_syn.data[c * ipc:(c + 1) * ipc] = get_images(c, ipc).detach().data
  image_syn = image_syn.detach().requires_grad_(True)
  syn_lr = syn_lr.detach().requires_grad_(True)
  optimizer_img = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5)
  optimizer_lr = torch.optim.SGD([syn_lr], lr=args.lr_lr, momentum=0.5)
  optimizer_img.zero_grad()
  criterion = torch.nn.CrossEntropyLoss()
  batch_syn = args.batch_syn or NUM_CLASSES * ipc
  dsa = args.dsa_strategy not in ("none", "None")
  dsa_param = utils.ParamDiffAug()

  files = expert_files(args.buffer)
  if not files:
    sys.exit(f"no replay_buffer_0.pt in {args.buffer}; make the experts first (buffer)")
  file_idx = expert_idx = 0
  random.shuffle(files)
  buffer = torch.load(files[file_idx])
  random.shuffle(buffer)
  model = model_name(args.width)
  epochs = len(buffer[0]) - 1
  if args.max_start_epoch - 1 + args.expert_epochs > epochs:
    sys.exit(f"start epochs below {args.max_start_epoch} + {args.expert_epochs} need experts of "
             f"{args.max_start_epoch - 1 + args.expert_epochs} epochs; these have {epochs}")

  losses, lrs, picks, cpu_s = [], [], [], []
  cpu0, wall0 = time.process_time(), time.perf_counter()
  for it in range(args.iterations):
    with seeded_clock(utils, rng):
      student_net = utils.get_network(model, CHANNEL, NUM_CLASSES, IM_SIZE, dist=False)
    student_net = reparam_module.ReparamModule(student_net)
    student_net.train()
    num_params = sum([np.prod(p.size()) for p in (student_net.parameters())])

    expert_trajectory = buffer[expert_idx]  # distill.py without --load_all
    picks.append(os.path.basename(files[file_idx]) + f"[{expert_idx}]")
    expert_idx += 1
    if expert_idx == len(buffer):
      expert_idx = 0
      file_idx += 1
      if file_idx == len(files):
        file_idx = 0
        random.shuffle(files)
      del buffer
      buffer = torch.load(files[file_idx])
      random.shuffle(buffer)

    start_epoch = np.random.randint(0, args.max_start_epoch)  # noqa: NPY002 (as distill.py)
    starting_params = expert_trajectory[start_epoch]
    target_params = expert_trajectory[start_epoch + args.expert_epochs]
    target_params = torch.cat([p.data.reshape(-1) for p in target_params], 0)
    student_params = [torch.cat([p.data.reshape(-1) for p in starting_params], 0)
                      .requires_grad_(True)]
    starting_params = torch.cat([p.data.reshape(-1) for p in starting_params], 0)
    syn_images = image_syn
    y_hat = label_syn
    indices_chunks = []
    for _ in range(args.syn_steps):
      if not indices_chunks:
        indices = torch.randperm(len(syn_images))
        indices_chunks = list(torch.split(indices, batch_syn))
      these_indices = indices_chunks.pop()
      x = syn_images[these_indices]
      this_y = y_hat[these_indices]
      if dsa:
        x = utils.DiffAugment(x, args.dsa_strategy, param=dsa_param)
      x = student_net(x, flat_param=student_params[-1])
      ce_loss = criterion(x, this_y)
      grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
      student_params.append(student_params[-1] - syn_lr * grad)

    param_loss = torch.tensor(0.0)
    param_dist = torch.tensor(0.0)
    param_loss += torch.nn.functional.mse_loss(student_params[-1], target_params, reduction="sum")
    param_dist += torch.nn.functional.mse_loss(starting_params, target_params, reduction="sum")
    param_loss /= num_params
    param_dist /= num_params
    param_loss /= param_dist
    grand_loss = param_loss

    optimizer_img.zero_grad()
    optimizer_lr.zero_grad()
    grand_loss.backward()
    optimizer_img.step()
    optimizer_lr.step()
    losses.append(grand_loss.item())
    lrs.append(syn_lr.item())
    cpu_s.append(time.process_time() - cpu0)
    if not np.isfinite(losses[-1]):
      sys.exit(f"iteration {it}: the loss is {losses[-1]} (start epoch {start_epoch})")
    del student_params
    if it % 10 == 0 or it == args.iterations - 1:
      print(f"iter = {it:04d}, loss = {losses[-1]:.4f}, syn_lr = {lrs[-1]:.5f}, "
            f"cpu {time.process_time() - cpu0:.1f}s", flush=True)

  record = {"side": "official", "distill_cpu_s": time.process_time() - cpu0,
            "distill_wall_s": time.perf_counter() - wall0, "loss": losses, "syn_lr": lrs,
            "cpu_s": cpu_s, "experts_used": picks, "commit": git_commit(args.mtt_root),
            "torch": torch.__version__, "buffer": os.path.abspath(args.buffer),
            "settings": {k: v for k, v in vars(args).items() if k != "command"}}
  os.makedirs(args.out, exist_ok=True)
  out = {name: os.path.join(args.out, f"{name}_mtt_official.npy")
         for name in ("images", "labels", "lr")}
  save_npy(out["images"], image_syn.detach().numpy().astype(np.float32))
  save_npy(out["labels"], label_syn.numpy().astype(np.int64))
  save_npy(out["lr"], np.asarray(syn_lr.item(), np.float32))
  write_json(os.path.join(args.out, "official.json"), record | out)
  print(f"distilled {tuple(image_syn.shape)}, lr {syn_lr.item():.5f}, in "
        f"{record['distill_cpu_s']:.1f} CPU-s", flush=True)


def evaluate(args, utils, torch, *, train_criterion=None, eval_args: dict | None = None) -> None:
  """`--nets` networks trained by the official evaluate_synset; prints one JSON line. DATM's and
  PAD's runners pass their `train_criterion` (soft cross-entropy; the labels file then holds
  (N, C) float logits) and `eval_args` (attributes their `evaluate_synset` reads beyond MTT's)."""
  _, _, testloader = mnist(utils, torch, args.cache)
  folder, name = os.path.split(args.support)
  images = np.load(args.support).astype(np.float32)
  labels = np.load(os.path.join(folder, name.replace("images", "labels")))
  lr_path = os.path.join(folder, name.replace("images", "lr"))
  lr = args.lr or (float(np.load(lr_path)) if os.path.exists(lr_path) else 0.01)
  if lr <= 0:  # torch's SGD raises "Invalid learning rate" on the first network
    sys.exit(f"{args.support}: the learning rate is {lr:.4g}; evaluate_synset cannot train at a "
             "rate <= 0 (pass --lr)")
  eargs = types.SimpleNamespace(
      lr_net=lr, epoch_eval_train=args.eval_epochs, batch_train=256, device="cpu",
      dsa=args.dsa_strategy not in ("none", "None"), dsa_strategy=args.dsa_strategy,
      dsa_param=utils.ParamDiffAug(), dc_aug_param=None, dataset="MNIST", **(eval_args or {}))
  soft = {} if train_criterion is None else {"train_criterion": train_criterion}
  labels = (torch.tensor(labels.astype(np.int64)) if train_criterion is None
            else torch.tensor(labels.astype(np.float32)))
  rng = np.random.default_rng(args.seed + 1000)
  accs, cpu0 = [], time.process_time()
  for k in range(args.nets):
    with seeded_clock(utils, rng):
      net = utils.get_network(model_name(args.width), CHANNEL, NUM_CLASSES, IM_SIZE)
    _, _, acc = utils.evaluate_synset(k, net, torch.tensor(images), labels, testloader, eargs,
                                      **soft)
    accs.append(float(acc))
  print(json.dumps({"support": args.support, "accs": accs, "lr": lr,
                    "model": model_name(args.width), "epochs": args.eval_epochs,
                    "cpu_s": time.process_time() - cpu0}))


def parameter_shapes(utils, width: int) -> list[tuple[int, ...]]:
  net = utils.get_network(model_name(width), CHANNEL, NUM_CLASSES, IM_SIZE, dist=False)
  return [tuple(p.shape) for p in net.parameters()]


def import_buffer(args, utils, torch) -> None:
  """Flat trajectories (official parameter order) -> one replay_buffer_<i>.pt per expert."""
  shapes = parameter_shapes(utils, args.width)
  sizes = [int(np.prod(s)) for s in shapes]
  with np.load(args.npz) as f:
    trajectories = f["trajectories"].astype(np.float32)
  if trajectories.shape[-1] != sum(sizes):
    sys.exit(f"{args.npz}: {trajectories.shape[-1]} parameters per snapshot; "
             f"{model_name(args.width)} has {sum(sizes)}")
  os.makedirs(args.out, exist_ok=True)
  for i, trajectory in enumerate(trajectories):
    timestamps = [[torch.tensor(part.reshape(shape)) for part, shape in
                   zip(np.split(row, np.cumsum(sizes)[:-1]), shapes, strict=True)]
                  for row in trajectory]
    save_torch(torch, [timestamps], os.path.join(args.out, f"replay_buffer_{i}.pt"))
  print(f"{len(trajectories)} experts of {trajectories.shape[1] - 1} epochs -> {args.out}")


def logits(args, utils, reparam_module, torch) -> None:
  """Logits of the official network with one expert's snapshot on the first --n test images."""
  _, dst_test, _ = mnist(utils, torch, args.cache)
  images = torch.stack([dst_test[i][0] for i in range(args.n)])
  experts = [t for path in expert_files(args.buffer) for t in torch.load(path)]
  snapshot = experts[args.expert][args.epoch]
  net = reparam_module.ReparamModule(
      utils.get_network(model_name(args.width), CHANNEL, NUM_CLASSES, IM_SIZE, dist=False))
  net.eval()
  flat = torch.cat([p.reshape(-1) for p in snapshot], 0)
  with torch.no_grad():
    out = net(images, flat_param=flat)
  np.savez(args.out, images=images.numpy(), logits=out.numpy())


def main(argv=None) -> None:
  args = parse_args(argv)
  import torch  # noqa: PLC0415

  torch.set_num_threads(args.threads)
  prepare_mnist(args.mnist_raw, args.cache)
  utils, reparam_module = import_official(args.mtt_root)
  np.random.seed(args.seed)  # noqa: NPY002 (distill.py draws from the global one)
  random.seed(args.seed)
  torch.manual_seed(args.seed)
  if args.command == "buffer":
    build_buffer(args, utils, torch)
  elif args.command == "distill":
    distill(args, utils, reparam_module, torch)
  elif args.command == "evaluate":
    evaluate(args, utils, torch)
  elif args.command == "import-buffer":
    import_buffer(args, utils, torch)
  else:
    logits(args, utils, reparam_module, torch)


if __name__ == "__main__":
  main()
