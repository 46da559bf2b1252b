"""Our Barlow Twins teacher (methods/barlow.py) for the official KRR-ST code (bench/peers/krr_st).

The official repository ships no teacher training: `train.py` loads a torchvision ResNet-18
checkpoint (`./teacher_ckpt/barlow_twins_resnet18_<data>.pt`, downloaded from the authors' drive),
which does not exist for MNIST. Both sides of the comparison therefore regress onto the same
teacher, ours, trained by `python -m experiments.teacher`; the official side runs it in PyTorch
(official.py `TorchTeacher`, a functional ResNet-18 of our layout). This module writes what that
needs, as one `.npz` (numpy only on the reading side):

- `param/<path>`, `stat/<path>`: the backbone's parameters and batch statistics, flattened by
  their flax paths (`stem/kernel`, `stage1_block0/conv_a/kernel`, `norm_stem/mean`, ...); conv
  kernels moved from HWIO to PyTorch's OIHW, everything else as it is;
- `mean`, `std`: the teacher's standardisation (C,), which the official side uses as its
  `K.Normalize` statistics (the official `MEAN` / `STD` tables have no MNIST entry);
- `check_images` (64, C, H, W) standardised test images and `check_features` (64, D): our
  teacher's representations of them, which official.py reproduces in PyTorch before it distils
  (relative Frobenius error printed and recorded; the run stops above `official.py`'s
  `TEACHER_TOLERANCE`);
- `width`, `dim`, `source` (the teacher file) and `config` (its settings, JSON).

Runs under the project's Python:

    python bench/peers/krr_st/convert.py --teacher runs/teachers/mnist-<digest>/teacher.msgpack \\
        --out runs/peers/krr_st/teachers/mnist-<digest>.npz
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))
sys.path.insert(0, REPO)  # run as a script: the repository's packages

__all__ = ["read_idx_images", "export_teacher"]

CHECK_IMAGES = 64


def read_idx_images(path: str, limit: int | None = None) -> np.ndarray:
  """(n, H, W) uint8 images of an idx3 file (`.gz` or not), the first `limit` of them."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    header = np.frombuffer(f.read(16), ">u4")
    if header[0] != 2051:
      raise ValueError(f"{path}: not an idx3 image file (magic {header[0]})")
    n, h, w = (int(v) for v in header[1:])
    n = n if limit is None else min(n, limit)
    return np.frombuffer(f.read(n * h * w), np.uint8).reshape(n, h, w)


def export_teacher(teacher_path: str, out: str, manual_dir: str) -> dict:
  """Writes `out` (see the module docstring) from the teacher file at `teacher_path`; its check
  images are the first 64 test images of the teacher's dataset in `manual_dir`. Returns a
  summary (dimension, width, dataset)."""
  from flax import traverse_util  # noqa: PLC0415

  from methods.barlow import load_teacher  # noqa: PLC0415

  teacher = load_teacher(teacher_path)
  config = teacher.config
  if config.get("backbone") != "resnet18":
    raise SystemExit(f"{teacher_path}: backbone {config.get('backbone')!r}; official.py's "
                     "TorchTeacher reproduces the resnet18 backbone only")
  arrays: dict[str, np.ndarray] = {}
  for kind, collection in (("param", "params"), ("stat", "batch_stats")):
    flat = traverse_util.flatten_dict(teacher.variables[collection]["backbone"], sep="/")
    for path, value in flat.items():
      value = np.asarray(value, np.float32)
      if value.ndim == 4:  # conv kernel HWIO -> OIHW
        value = value.transpose(3, 2, 0, 1)
      arrays[f"{kind}/{path}"] = np.ascontiguousarray(value)
  dataset = config["dataset"]
  raw = read_idx_images(os.path.join(manual_dir, dataset, "t10k-images-idx3-ubyte.gz"),
                        CHECK_IMAGES)
  mean = np.asarray(config["mean"], np.float32)
  std = np.asarray(config["std"], np.float32)
  x = ((raw[..., None].astype(np.float32) / 255.0) - mean) / std  # (n, H, W, C)
  features = np.asarray(teacher.features(x), np.float32)
  arrays |= {"mean": mean, "std": std, "check_images": x.transpose(0, 3, 1, 2).copy(),
             "check_features": features, "width": np.asarray(int(config["width"])),
             "dim": np.asarray(teacher.dim), "source": np.asarray(os.path.abspath(teacher_path)),
             "config": np.asarray(json.dumps(config, sort_keys=True))}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out[:-len(".npz")] + ".tmp.npz" if out.endswith(".npz") else out + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, out)
  return {"dim": int(teacher.dim), "width": int(config["width"]), "dataset": dataset,
          "tensors": len([k for k in arrays if k.startswith(("param/", "stat/"))])}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--teacher", required=True, help="teacher.msgpack of experiments.teacher")
  p.add_argument("--out", required=True, help="the .npz official.py reads (--teacher-npz)")
  p.add_argument("--manual-dir", default=os.environ.get("KIP_MANUAL_DIR", "/work/shared/data"),
                 help="folder with <dataset>/t10k-images-idx3-ubyte.gz (the check images)")
  args = p.parse_args(argv)
  summary = export_teacher(args.teacher, args.out, args.manual_dir)
  print(f"written {args.out}: {summary}")


if __name__ == "__main__":
  main()
