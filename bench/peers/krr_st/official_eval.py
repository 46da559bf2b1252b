"""The official KRR-ST evaluation (db-Lee/selfsup_dd, `test.py` with `--method krr_st`) of one
distilled set on MNIST or Fashion-MNIST, run offline on a CPU.

Runs under the PyTorch virtual environment (bench/peers/README.md, plus `kornia==0.7.1`). For each
`--seeds` value it repeats `test.py:main` for one target dataset: the seeds, the official
`algorithms/pretrain_krr_st.run` (a fresh `convnet_<w>_<2w>_<4w>_bn` trained by MSE on the set's
images and targets: SGD 0.1, momentum 0.9, weight decay 1e-3, batch 256, `--pretrain-epochs`
epochs) and `algorithms/finetune.run` (a new head, every layer trained with cross-entropy: SGD
0.01, momentum 0.9, weight decay 5e-4, cosine over `--finetune-steps`, batch 256, the `get_aug`
augmentation; test accuracy on the whole test split), then `algorithms/linear_eval.run` as
`train.py`'s meta-test calls it (frozen features, a linear layer: SGD 0.2, momentum 0.9, no
weight decay, cosine over `--linear-steps`, batch 512). All three unchanged.

What differs from `test.py` (bench/peers/krr_st/README.md): the target data are the idx files of
`--target` in [0, 1] (`get_loader` reads `./datasets/<name>/X_tr_<size>.pth`, 3-channel datasets
only), `--labelled` class-balanced training images (0: all), with `K.Normalize` by the target's
training mean and std (computed here; `MEAN` / `STD` have no 28-pixel entry) and `get_aug`'s
branches (SVHN's, no flip, for MNIST; the others', with flips, for Fashion-MNIST); the sizes are
flags (`test.py`: 1,000 pre-training epochs, 10,000 or 5,000 fine-tuning iterations); each seed is
its own run (`test.py` seeds once and runs `--num_test` 3 in a row); the linear probe is added
(`test.py` fine-tunes only). The set is read from our `.npz` (`images` NHWC, `targets`), fed to
the network as stored, as `test.py` feeds `x_syn.pt`.

Writes `--out` (JSON): settings, commit, per seed the fine-tuned and linear-probe test accuracies
(fractions) and the CPU seconds of each stage.

    /work/venvs/torch/bin/python bench/peers/krr_st/official_eval.py --support SET.npz --out R.json
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # official.py beside this file (torch side; no jax)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))
from official import augmentations, import_official, load_split  # noqa: E402

from bench.peers.common import write_json  # noqa: E402
from bench.peers.dm.official import git_commit  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--root", default=os.environ.get("SELFSUP_DD_ROOT", "/work/peers/selfsup_dd"),
                 help="checkout of db-Lee/selfsup_dd (or $SELFSUP_DD_ROOT)")
  p.add_argument("--support", required=True, help="the set (.npz: images NHWC, targets)")
  p.add_argument("--target", default="fashion_mnist", choices=("mnist", "fashion_mnist"))
  p.add_argument("--manual-dir", default="/work/shared/data")
  p.add_argument("--cache", default="/work/peers/cache/krr_st")
  p.add_argument("--labelled", type=int, default=1000,
                 help="class-balanced labelled training images of the target (0: all)")
  p.add_argument("--subset-seed", type=int, default=0,
                 help="the labelled subset: default_rng([seed, 11]) per class (the same subset "
                      "for every set)")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated; one evaluation each")
  p.add_argument("--width", type=int, default=32, help="test_model convnet_<w>_<2w>_<4w>_bn")
  p.add_argument("--pretrain-epochs", type=int, default=1000, help="pre_epoch")
  p.add_argument("--finetune-steps", type=int, default=500,
                 help="test_iteration of finetune (official 10,000 / 5,000)")
  p.add_argument("--linear-steps", type=int, default=5000,
                 help="test_iteration of linear_eval (train.py: 5,000); 0: no probe")
  p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
  p.add_argument("--out", required=True, help="result JSON")
  return p.parse_args(argv)


def labelled_subset(y, labelled: int, seed: int) -> np.ndarray:
  """`labelled // 10` distinct random indices of each class (kip.data.class_balanced_indices'
  rule; the images differ from ours, whose tfds split orders the images otherwise)."""
  y = np.asarray(y)
  if not labelled:
    return np.arange(len(y))
  rng = np.random.default_rng([seed, 11])
  per_class = labelled // 10
  return np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False)
                         for c in range(10)])


def main(argv=None) -> None:
  args = parse_args(argv)
  import torch  # noqa: PLC0415

  torch.set_num_threads(args.threads)
  official = import_official(args.root)
  with np.load(args.support) as f:
    x_syn = torch.from_numpy(np.asarray(f["images"], np.float32).transpose(0, 3, 1, 2).copy())
    y_syn = torch.from_numpy(np.asarray(f["targets"], np.float32))
  x_tr, y_tr = load_split(args.target, args.manual_dir, args.cache, train=True)
  x_te, y_te = load_split(args.target, args.manual_dir, args.cache, train=False)
  mean, std = x_tr.mean(dim=(0, 2, 3)).numpy(), x_tr.std(dim=(0, 2, 3)).numpy()
  idx = torch.from_numpy(labelled_subset(y_tr.numpy(), args.labelled, args.subset_seed))
  x_tr, y_tr = x_tr[idx], y_tr[idx]
  aug_tr, aug_te = augmentations(mean, std, flip=args.target != "mnist")
  device = torch.device("cpu")
  model_name = f"convnet_{args.width}_{2 * args.width}_{4 * args.width}_bn"
  img_shape = (1, 28, 28)

  def loaders(batch_size):  # data/wrapper.py get_loader
    dl_tr = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_tr, y_tr),
                                        batch_size=batch_size, num_workers=0, shuffle=True,
                                        pin_memory=True)
    dl_te = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_te, y_te),
                                        batch_size=batch_size, num_workers=0, shuffle=False,
                                        pin_memory=True)
    return dl_tr, dl_te

  # test.py's settings for krr_st, and train.py's for the linear evaluation
  pre_args = argparse.Namespace(pre_opt="sgd", pre_epoch=args.pretrain_epochs,
                                pre_batch_size=256, pre_lr=0.1, pre_wd=1e-3, img_shape=img_shape,
                                num_pretrain_classes=y_syn.shape[-1])
  fine_args = argparse.Namespace(test_opt="sgd", test_iteration=args.finetune_steps,
                                 test_batch_size=256, test_lr=0.01, test_wd=5e-4,
                                 img_shape=img_shape, num_classes=10)
  linear_args = argparse.Namespace(test_opt="sgd", test_iteration=args.linear_steps,
                                   test_batch_size=512, test_lr=0.2, test_wd=0.0,
                                   img_shape=img_shape, num_classes=10)
  runs = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (as test.py)
    torch.manual_seed(seed)
    t0 = time.process_time()
    init_model = official.pretrain_krr_st.run(pre_args, device, model_name, x_syn, y_syn)
    init_model = init_model.cpu()
    t1 = time.process_time()
    dl_tr, dl_te = loaders(fine_args.test_batch_size)
    _, fine_acc = official.finetune.run(fine_args, device, model_name, init_model, dl_tr, dl_te,
                                        aug_tr, aug_te)
    t2 = time.process_time()
    run = {"seed": seed, "finetune_acc": fine_acc / 100, "pretrain_cpu_s": t1 - t0,
           "finetune_cpu_s": t2 - t1}
    if args.linear_steps:
      dl_tr, dl_te = loaders(linear_args.test_batch_size)
      _, linear_acc = official.linear_eval.run(linear_args, device, model_name, init_model,
                                               dl_tr, dl_te, aug_tr, aug_te)
      run |= {"linear_acc": linear_acc / 100, "linear_cpu_s": time.process_time() - t2}
    print(f"seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in run.items() if k != "seed"),
          flush=True)
    runs.append(run)
  write_json(args.out, {"settings": vars(args), "commit": git_commit(args.root),
                        "model": model_name, "labelled": len(x_tr),
                        "target_stats": {"mean": mean.tolist(), "std": std.tolist()},
                        "finetune_acc": [r["finetune_acc"] for r in runs],
                        "linear_acc": [r["linear_acc"] for r in runs if "linear_acc" in r],
                        "runs": runs})
  print(f"written {args.out}")


if __name__ == "__main__":
  main()
