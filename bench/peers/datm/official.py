"""The official DATM code (NUS-HPC-AI-Lab/DATM: `buffer/buffer_FTD.py`, `distill/DATM.py`) on
MNIST, run offline on a CPU.

Runs under the PyTorch virtual environment of bench/peers/README.md, never under the project's
Python. It imports the official `utils.utils_baseline` (the distillation's and evaluation's
`get_network`, `DiffAugment`, `ParamDiffAug`, `evaluate_synset`), `utils.utils_gsam` (the
buffer's `get_network` and `epoch`), `gsam` (`GSAM`, `ProportionScheduler`) and `reparam_module`
from a checkout outside this repository (`--datm-root` or $DATM_ROOT, with
bench/peers/mtt/torch2-compat.patch applied), and repeats the loops of `buffer_FTD.py` and
`DATM.py` statement for statement. DATM is built on MTT's code, so the MTT runner
(bench/peers/mtt/official.py) supplies everything the two share: MNIST (`mnist`, `organise`),
the expert loop (`build_buffer`, here with the GSAM optimiser of `buffer_FTD.py`), the expert
files and the evaluation (`evaluate`, here with DATM's soft cross-entropy). Subcommands:

- `buffer`: `buffer_FTD.py`: experts trained by GSAM (the flat-trajectory optimiser of FTD, Du
  et al. 2023) around SGD, one `replay_buffer_<i>.pt` each as it finishes, and `buffer.json`.
  `--no-sam` trains them with plain SGD instead (MTT's `buffer.py`).
- `distill`: `DATM.py`'s loop on the experts of `--buffer`; writes `images_datm_official.npy`
  (N, 1, 28, 28) float32 in DC's normalised space, `labels_datm_official.npy` (N, 10) float32,
  the learned soft labels as logits, and `lr_datm_official.npy` () float32 (a set
  `kip.io.load_distilled` reads: logits made probabilities by a softmax, lr included), and
  `official.json` (settings, commit, the initial labels' accuracy, every iteration's loss, start
  epoch, whether it was applied, learned lr and CPU seconds).
- `evaluate`: the official `evaluate_synset` with DATM's `SoftCrossEntropy` at the set's lr on an
  images/labels(/lr) `.npy` triple; prints one JSON line.

PAD's runner (bench/peers/pad/official.py) calls `distill` with its parameter selection
(`matched`) and `buffer` with its curriculum.

What differs from running the official scripts, all of it on purpose and listed in
bench/peers/datm/README.md: MNIST (DC's branch, as MTT's runner); `.clone()` of the experts'
snapshots (on a CPU `.cpu()` is the parameter itself); one expert per file; randomness seeded by
`--seed` (the clock in `get_network` replaced by a seeded Generator; `DATM.py` seeds everything
with 0); `--iterations N` makes N updates (`Iteration` makes N + 1); no evaluation, saving or
wandb inside the loop; the CPU device for everything the official code sends to `cuda:0`.

    /work/venvs/torch/bin/python bench/peers/datm/official.py buffer --experts 4 --epochs 6 \\
        --out runs/peers/datm/experts/official
    /work/venvs/torch/bin/python bench/peers/datm/official.py distill \\
        --buffer runs/peers/datm/experts/official --ipc 1 --seed 0 --out runs/peers/datm/x
"""

from __future__ import annotations

import argparse
import importlib
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
from bench.peers.mtt import official as mtt  # noqa: E402

CHANNEL, IM_SIZE, NUM_CLASSES = mtt.CHANNEL, mtt.IM_SIZE, mtt.NUM_CLASSES
DSA_STRATEGY = mtt.DSA_STRATEGY
LABEL_BATCH = 256  # DATM.py's batch_size of the initial-image and label passes


def common_flags(root_flag: str, root_env: str, root_default: str) -> argparse.ArgumentParser:
  """The flags of every subcommand (PAD's runner makes its own with its checkout's flag)."""
  common = argparse.ArgumentParser(add_help=False,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  common.add_argument(root_flag, dest="root", default=os.environ.get(root_env, root_default),
                      help=f"the official checkout (or ${root_env})")
  common.add_argument("--mnist-raw", default="/work/shared/data/mnist",
                      help="folder with MNIST's four idx .gz files")
  common.add_argument("--cache", default="/work/peers/cache/mnist",
                      help="torchvision root: MNIST/raw/ is filled from --mnist-raw once")
  common.add_argument("--width", type=int, default=32, choices=(32, 64, 128, 256),
                      help="ConvNet width: the official ConvNetW<width>")
  common.add_argument("--seed", type=int, default=0)
  common.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
  return common


def add_buffer_flags(b: argparse.ArgumentParser) -> None:
  """buffer_FTD.py's flags (PAD's buffer_CL.py has the same and its curriculum's)."""
  b.add_argument("--out", required=True, help="folder of the replay_buffer_<i>.pt files")
  b.add_argument("--experts", type=int, default=4, help="--num_experts")
  b.add_argument("--epochs", type=int, default=6, help="--train_epochs")
  b.add_argument("--lr-teacher", type=float, default=0.01)
  b.add_argument("--mom", type=float, default=0.0, help="SGD momentum")
  b.add_argument("--l2", type=float, default=0.0, help="weight decay")
  b.add_argument("--batch-train", type=int, default=256)
  b.add_argument("--dsa-strategy", default=DSA_STRATEGY)
  b.add_argument("--sam", action=argparse.BooleanOptionalAction, default=True,
                 help="GSAM around SGD, as the official script (off: plain SGD, MTT's buffer.py)")
  b.add_argument("--rho-max", type=float, default=0.01, help="GSAM rho (the README's 0.01; "
                 "the script's default 2.0)")
  b.add_argument("--rho-min", type=float, default=0.01)
  b.add_argument("--alpha", type=float, default=0.3, help="GSAM alpha (the README's 0.3; the "
                 "script's default 0.4)")
  b.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                 help="adaptive GSAM (the script's default, type=bool: always on from the CLI)")
  b.add_argument("--test-every-epoch", action=argparse.BooleanOptionalAction, default=True,
                 help="a test pass after every epoch, as the script (off: after the last only)")
  b.add_argument("--train-size", type=int, default=0,
                 help="train on a class-balanced random subset of this many images (0: all; "
                      "for smoke tests)")


def add_distill_flags(d: argparse.ArgumentParser) -> None:
  """DATM.py's flags (its `utils/cfg.py` and configs/) that the comparison sets."""
  d.add_argument("--buffer", required=True, help="folder of replay_buffer_<n>.pt files")
  d.add_argument("--out", required=True, help="output folder")
  d.add_argument("--ipc", type=int, default=1)
  d.add_argument("--iterations", type=int, default=300,
                 help="image updates (DATM.py's --Iteration N makes N + 1)")
  d.add_argument("--syn-steps", type=int, default=10)
  d.add_argument("--expert-epochs", type=int, default=2)
  d.add_argument("--min-start-epoch", type=int, default=0)
  d.add_argument("--current-max-start-epoch", type=int, default=2,
                 help="the start epochs' upper bound at the first iteration "
                      "(Sequential_Generation)")
  d.add_argument("--max-start-epoch", type=int, default=5,
                 help="... growing linearly to this (exclusive) at --expansion-end-epoch")
  d.add_argument("--expansion-end-epoch", type=int, default=0,
                 help="the iteration at which the bound reaches --max-start-epoch (0: the last, "
                      "--iterations - 1)")
  d.add_argument("--sequential-generation", action=argparse.BooleanOptionalAction, default=True,
                 help="the widening bound (off: start epochs below --max-start-epoch throughout)")
  d.add_argument("--batch-syn", type=int, default=0, help="0: all images (the cfg's None)")
  d.add_argument("--lr-img", type=float, default=100.0)
  d.add_argument("--lr-lr", type=float, default=1e-5)
  d.add_argument("--lr-teacher", type=float, default=0.01, help="the student's initial lr")
  d.add_argument("--lr-y", type=float, default=2.0, help="SGD learning rate of the soft labels")
  d.add_argument("--momentum-y", type=float, default=0.9, help="the cfg's Momentum_y")
  d.add_argument("--threshold", type=float, default=1.0,
                 help="an update whose loss exceeds this is not applied")
  d.add_argument("--pix-init", default="samples_predicted_correctly",
                 choices=("samples_predicted_correctly", "real", "noise"))
  d.add_argument("--label-model-timestamp", type=int, default=-1,
                 help="the experts' epoch whose logits pick the images and initialise the labels "
                      "(the cfg's Label_Model_Timestamp; -1: the last)")
  d.add_argument("--dsa-strategy", default=DSA_STRATEGY)


def add_evaluate_flags(e: argparse.ArgumentParser) -> None:
  e.add_argument("--support", required=True,
                 help="an images_*.npy (N, 1, 28, 28) in DC's space; labels_*.npy ((N, 10) "
                      "logits) and (if present) lr_*.npy beside it")
  e.add_argument("--nets", type=int, default=1, help="networks trained on the set")
  e.add_argument("--lr", type=float, default=0.0,
                 help="learning rate (0: the set's learned one, lr_*.npy beside it, else 0.01)")
  e.add_argument("--eval-epochs", type=int, default=1000, help="the cfg's epoch_eval_train")
  e.add_argument("--dsa-strategy", default=DSA_STRATEGY)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  common = common_flags("--datm-root", "DATM_ROOT", "/work/peers/DATM")
  sub = p.add_subparsers(dest="command", required=True)
  fmt = argparse.ArgumentDefaultsHelpFormatter
  add_buffer_flags(sub.add_parser("buffer", parents=[common], formatter_class=fmt,
                                  help="train experts as buffer_FTD.py does"))
  add_distill_flags(sub.add_parser("distill", parents=[common], formatter_class=fmt,
                                   help="DATM.py's loop"))
  add_evaluate_flags(sub.add_parser("evaluate", parents=[common], formatter_class=fmt,
                                    help="the official evaluate_synset, soft cross-entropy"))
  return p.parse_args(argv)


def import_official(root: str, marker: str = "distill/DATM.py"):
  """The official modules from the checkout: (utils_baseline, utils_gsam, gsam,
  reparam_module). torchvision without its _C operators; `kornia` (ZCA only) stubbed."""
  for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations",
               "kornia"):
    sys.modules.setdefault(name, types.ModuleType(name))
  if not os.path.exists(os.path.join(root, marker)):
    sys.exit(f"{root}: not the official checkout (no {marker}); pass the checkout's folder")
  # the scripts run from distill/ or buffer/ with "../" on their path: the modules import each
  # other by top-level name (`networks`, `utils.utils_baseline`, `gsam` from buffer/)
  sys.path[:0] = [root, os.path.join(root, "buffer")]
  return (importlib.import_module("utils.utils_baseline"),
          importlib.import_module("utils.utils_gsam"), importlib.import_module("gsam"),
          importlib.import_module("reparam_module"))


# ----------------------------------------------------------------------------- experts

def gsam_trainer(args, utils_gsam, gsam, torch):
  """buffer_FTD.py's optimiser, for `mtt.build_buffer`: GSAM (rho from a ProportionScheduler
  on a StepLR of gamma 1, i.e. constant) around SGD, stepped by `utils_gsam.epoch`, which
  augments a batch once and takes GSAM's two forward-backward passes on it."""

  def trainer(teacher_net, eargs, criterion, trainloader):
    lr = args.lr_teacher
    base_optimizer = torch.optim.SGD(teacher_net.parameters(), lr=lr, momentum=args.mom,
                                     weight_decay=args.l2)
    scheduler = torch.optim.lr_scheduler.StepLR(
        base_optimizer, step_size=args.epochs * len(trainloader), gamma=1)
    rho_scheduler = gsam.ProportionScheduler(pytorch_lr_scheduler=scheduler, max_lr=lr,
                                             min_lr=lr, max_value=args.rho_max,
                                             min_value=args.rho_min)
    teacher_optim = gsam.GSAM(params=teacher_net.parameters(), base_optimizer=base_optimizer,
                              model=teacher_net, gsam_alpha=args.alpha,
                              rho_scheduler=rho_scheduler, adaptive=args.adaptive)
    teacher_optim.zero_grad()
    return lambda loader: utils_gsam.epoch("train", dataloader=loader, net=teacher_net,
                                           optimizer=teacher_optim, criterion=criterion,
                                           args=eargs, aug=True, scheduler=scheduler)

  return trainer


def gsam_test(utils_gsam, net, testloader, criterion, eargs):
  """buffer_FTD.py's test pass (`utils_gsam.epoch` in test mode: no gradient)."""
  return utils_gsam.epoch("test", dataloader=testloader, net=net, optimizer=None,
                          criterion=criterion, args=eargs, aug=False, scheduler=None)


def build_buffer(args, modules, torch, curriculum=None, subset=None) -> None:
  """buffer_FTD.py (or PAD's buffer_CL.py with `curriculum` and its `subset`) through the MTT
  runner's loop."""
  _, utils_gsam, gsam, _ = modules
  trainer = (gsam_trainer(args, utils_gsam, gsam, torch) if args.sam
             else mtt.sgd_trainer(args, utils_gsam, torch))  # --no-sam: MTT's buffer.py
  mtt.build_buffer(args, utils_gsam, torch, trainer=trainer, tester=gsam_test,
                   curriculum=curriculum, subset=subset, checkout=args.root, ignore=("root",))


# ----------------------------------------------------------------------------- distillation

def soft_cross_entropy(torch):
  """DATM.py's `SoftCrossEntropy`: sum(-log_softmax(x) * softmax(y)) / batch."""
  functional = torch.nn.functional

  def criterion(inputs, target):
    input_log_likelihood = -functional.log_softmax(inputs, dim=1)
    target_log_likelihood = functional.softmax(target, dim=1)
    batch = inputs.shape[0]
    return torch.sum(torch.mul(input_log_likelihood, target_log_likelihood)) / batch

  return criterion


def all_parameters(torch):
  """DATM.py's matching sums: every parameter (`matched` of `distill`)."""
  functional = torch.nn.functional

  def matched(student, target, start):
    return (functional.mse_loss(student, target, reduction="sum"),
            functional.mse_loss(start, target, reduction="sum"))

  return matched


def flat_snapshot(torch, snapshot):
  return torch.cat([p.data.reshape(-1) for p in snapshot], 0)


def distill(args, modules, torch, *, matched=None, name: str = "datm") -> None:
  """DATM.py's loop (no ZCA, no texture, one process, no load_all) on the experts in `--buffer`;
  `matched(student, target, start) -> (sum of squared errors, sum of squared distances)` over
  the parameters the loss keeps (default: all, DATM; PAD's runner passes its selection)."""
  utils, _, _, reparam_module = modules
  matched = matched or all_parameters(torch)
  dst_train, _, _ = mtt.mnist(utils, torch, args.cache)
  images_all, _, indices_class = mtt.organise(torch, dst_train)
  rng = np.random.default_rng(args.seed)  # stands in for get_network's clock
  model = mtt.model_name(args.width)

  def get_images(c, n):  # DATM.py's: global np.random, seeded in main()
    idx_shuffle = np.random.permutation(indices_class[c])[:n]  # noqa: NPY002 (as DATM.py)
    return images_all[idx_shuffle]

  def network():
    with seeded_clock(utils, rng):
      return utils.get_network(model, CHANNEL, NUM_CLASSES, IM_SIZE, dist=False)

  ipc = args.ipc
  label_syn = torch.tensor(np.array([np.ones(ipc) * i for i in range(NUM_CLASSES)]),
                           dtype=torch.long, requires_grad=False).view(-1)
  image_syn = torch.randn(size=(NUM_CLASSES * ipc, CHANNEL, *IM_SIZE), dtype=torch.float)
  syn_lr = torch.tensor(args.lr_teacher)
  expert_files = mtt.expert_files(args.buffer)
  if not expert_files:
    sys.exit(f"no replay_buffer_0.pt in {args.buffer}; make the experts first (buffer)")
  file_idx = expert_idx = 0
  expert_id = list(range(len(expert_files)))
  random.shuffle(expert_id)
  buffer = torch.load(expert_files[expert_id[file_idx]])
  buffer_id = list(range(len(buffer)))
  random.shuffle(buffer_id)
  epochs = len(buffer[0]) - 1
  if args.max_start_epoch - 1 + args.expert_epochs > epochs:
    sys.exit(f"start epochs below {args.max_start_epoch} + {args.expert_epochs} need experts of "
             f"{args.max_start_epoch - 1 + args.expert_epochs} epochs; these have {epochs}")
  # experts in file order, for the label passes (DATM.py walks `label_expert_files`)
  label_experts = [(path, j) for path in expert_files for j in range(len(torch.load(path)))]
  ts = args.label_model_timestamp

  if args.pix_init == "real":
    for c in range(NUM_CLASSES):
      image_syn.data[c * ipc:(c + 1) * ipc] = get_images(c, ipc).detach().data
  elif args.pix_init == "samples_predicted_correctly":
    temp_net = reparam_module.ReparamModule(network().eval())
    temp_net.eval()
    temp_params = flat_snapshot(torch, torch.load(expert_files[0])[0][ts])
    for c in range(NUM_CLASSES):
      data_for_class_c = get_images(c, len(indices_class[c])).detach().data
      select_times = cur = 0
      index = []
      while len(index) < ipc:
        current_data_batch = data_for_class_c[
            LABEL_BATCH * select_times:LABEL_BATCH * (select_times + 1)].detach()
        if LABEL_BATCH * select_times > len(data_for_class_c):
          # DATM.py: the next expert, as `files[int(cur/10)%10][cur%10]` walks 10 files of 10
          select_times = 0
          cur += 1
          path, j = label_experts[cur % min(100, len(label_experts))]
          temp_params = flat_snapshot(torch, torch.load(path)[j][ts])
          continue
        logits = temp_net(current_data_batch, flat_param=temp_params).detach()
        prediction_class = np.argmax(logits.cpu().data.numpy(), axis=-1)
        for i in range(len(prediction_class)):
          if prediction_class[i] == c and len(index) < ipc:
            index.append(LABEL_BATCH * select_times + i)
            index = list(set(index))
        select_times += 1
      temp_img = torch.index_select(data_for_class_c, dim=0, index=torch.tensor(index))
      image_syn.data[c * ipc:(c + 1) * ipc] = temp_img.detach()

  image_syn = image_syn.detach().requires_grad_(True)
  syn_lr = syn_lr.detach().requires_grad_(True)
  optimizer_img = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5)
  optimizer_lr = torch.optim.SGD([syn_lr], lr=args.lr_lr, momentum=0.5)
  optimizer_img.zero_grad()
  criterion = soft_cross_entropy(torch)

  # the initial soft labels
  if args.pix_init == "samples_predicted_correctly":
    # every expert's logits at `ts`, averaged over the experts that classify the image correctly
    temp_net = reparam_module.ReparamModule(network().eval())
    temp_net.eval()
    logits = []
    for path in expert_files:
      for j in torch.load(path):
        params = flat_snapshot(torch, j[ts])
        batches = [temp_net(image_syn[LABEL_BATCH * s:LABEL_BATCH * (s + 1)].detach(),
                            flat_param=params).detach()
                   for s in range((len(image_syn) + LABEL_BATCH - 1) // LABEL_BATCH)]
        logits.append(torch.cat(batches, 0).cpu())
    logits_tensor = torch.stack(logits)
    correct = torch.argmax(logits_tensor, dim=2) == label_syn.view(1, -1)
    correct_logits = (logits_tensor * correct.unsqueeze(2).float()).sum(dim=0)
    initial_labels = correct_logits / correct.sum(dim=0, dtype=torch.float).unsqueeze(1)
  else:  # "real" (and noise): the first loaded file's first expert, its last epoch
    temp_net = reparam_module.ReparamModule(network())
    temp_net.eval()
    initial_labels = temp_net(image_syn, flat_param=flat_snapshot(torch, buffer[0][-1]))
  initial_acc = float(np.mean(np.argmax(initial_labels.detach().numpy(), -1)
                              == label_syn.numpy()))
  print(f"InitialAcc:{initial_acc}", flush=True)
  label_syn = initial_labels.detach().clone().requires_grad_(True)
  optimizer_y = torch.optim.SGD([label_syn], lr=args.lr_y, momentum=args.momentum_y)
  del temp_net

  batch_syn = args.batch_syn or NUM_CLASSES * ipc
  dsa = args.dsa_strategy not in ("none", "None")
  dsa_param = utils.ParamDiffAug()
  expansion_end = args.expansion_end_epoch or max(args.iterations - 1, 1)
  losses, lrs, applied, starts, picks, cpu_s = [], [], [], [], [], []
  cpu0, wall0 = time.process_time(), time.perf_counter()
  for it in range(args.iterations):
    student_net = reparam_module.ReparamModule(network())
    student_net.train()
    num_params = sum([np.prod(p.size()) for p in (student_net.parameters())])

    expert_trajectory = buffer[buffer_id[expert_idx]]
    picks.append(os.path.basename(expert_files[expert_id[file_idx]])
                 + f"[{buffer_id[expert_idx]}]")
    expert_idx += 1
    if expert_idx == len(buffer):
      expert_idx = 0
      file_idx += 1
      if file_idx == len(expert_files):
        file_idx = 0
        random.shuffle(expert_id)
      del buffer
      buffer = torch.load(expert_files[expert_id[file_idx]])
      random.shuffle(buffer_id)

    if args.sequential_generation:  # only match easy trajectories early
      upper_bound = args.current_max_start_epoch + int(
          (args.max_start_epoch - args.current_max_start_epoch) * it / expansion_end)
      upper_bound = min(upper_bound, args.max_start_epoch)
    else:
      upper_bound = args.max_start_epoch
    start_epoch = np.random.randint(args.min_start_epoch, upper_bound)  # noqa: NPY002

    starting_params = expert_trajectory[start_epoch]
    target_params = flat_snapshot(torch, expert_trajectory[start_epoch + args.expert_epochs])
    student_params = [flat_snapshot(torch, starting_params).requires_grad_(True)]
    starting_params = flat_snapshot(torch, starting_params)
    syn_images, y_hat = image_syn, label_syn
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
    loss_sum, dist_sum = matched(student_params[-1], target_params, starting_params)
    param_loss += loss_sum
    param_dist += dist_sum
    param_loss /= num_params
    param_dist /= num_params
    param_loss /= param_dist
    grand_loss = param_loss

    optimizer_img.zero_grad()
    optimizer_lr.zero_grad()
    optimizer_y.zero_grad()
    grand_loss.backward()
    applied.append(bool(grand_loss <= args.threshold))
    if applied[-1]:
      optimizer_y.step()
      optimizer_img.step()
      optimizer_lr.step()
    losses.append(grand_loss.item())
    lrs.append(syn_lr.item())
    starts.append(int(start_epoch))
    cpu_s.append(time.process_time() - cpu0)
    if not np.isfinite(losses[-1]):
      sys.exit(f"iteration {it}: the loss is {losses[-1]} (start epoch {start_epoch})")
    del student_params
    if it % 10 == 0 or it == args.iterations - 1:
      print(f"iter = {it:04d}, loss = {losses[-1]:.4f}, start {start_epoch}, "
            f"{'applied' if applied[-1] else 'skipped'}, syn_lr = {lrs[-1]:.5f}, "
            f"cpu {time.process_time() - cpu0:.1f}s", flush=True)

  record = {"side": "official", "method": name, "distill_cpu_s": time.process_time() - cpu0,
            "distill_wall_s": time.perf_counter() - wall0, "loss": losses, "syn_lr": lrs,
            "applied": applied, "start_epoch": starts, "cpu_s": cpu_s, "experts_used": picks,
            "initial_label_acc": initial_acc, "skipped_fraction": 1 - float(np.mean(applied)),
            "commit": git_commit(args.root), "torch": torch.__version__,
            "buffer": os.path.abspath(args.buffer),
            "settings": {k: v for k, v in vars(args).items() if k != "command"}}
  os.makedirs(args.out, exist_ok=True)
  out = {key: os.path.join(args.out, f"{key}_{name}_official.npy")
         for key in ("images", "labels", "lr")}
  mtt.save_npy(out["images"], image_syn.detach().numpy().astype(np.float32))
  mtt.save_npy(out["labels"], label_syn.detach().numpy().astype(np.float32))
  mtt.save_npy(out["lr"], np.asarray(syn_lr.item(), np.float32))
  write_json(os.path.join(args.out, "official.json"), record | out)
  print(f"distilled {tuple(image_syn.shape)}, lr {syn_lr.item():.5f}, "
        f"{100 * record['skipped_fraction']:.0f}% of the updates skipped, in "
        f"{record['distill_cpu_s']:.1f} CPU-s", flush=True)


def evaluate(args, modules, torch) -> None:
  """The official evaluate_synset as DATM.py calls it: soft cross-entropy on the logits."""
  utils = modules[0]
  # parall_eva: DATM's `epoch` and `evaluate_synset` use cuda:0 unless it is set
  mtt.evaluate(args, utils, torch, train_criterion=soft_cross_entropy(torch),
               eval_args={"parall_eva": True})


def run(args, modules, torch, *, matched=None, name="datm", curriculum=None,
        subset=None) -> None:
  """Seeds and runs one subcommand (PAD's runner passes its `matched`, `curriculum` and
  `subset`)."""
  np.random.seed(args.seed)  # noqa: NPY002 (DATM.py draws from the global one)
  random.seed(args.seed)
  torch.manual_seed(args.seed)
  if args.command == "buffer":
    build_buffer(args, modules, torch, curriculum=curriculum, subset=subset)
  elif args.command == "distill":
    distill(args, modules, torch, matched=matched, name=name)
  else:
    evaluate(args, modules, torch)


def main(argv=None) -> None:
  args = parse_args(argv)
  import torch  # noqa: PLC0415

  torch.set_num_threads(args.threads)
  prepare_mnist(args.mnist_raw, args.cache)
  run(args, import_official(args.root), torch)


if __name__ == "__main__":
  main()
