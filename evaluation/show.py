"""Pictures of a distilled set or of a run's accuracy curve (`experiments.show`'s job): the set's
images in rows by class, mapped back from preprocessed space; a KRR-ST set's teacher
representations (PCA); test accuracy against step from metrics.jsonl files.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

from kip import cli
from kip.command import Job
from kip.datasets import DataError
from kip.plots import plot_curves, plot_image_grid, plot_projection, read_curve
from kip.readers import dataset_optional

__all__ = ["Config", "JOB", "writable_output"]

f = cli.field


@dataclasses.dataclass(frozen=True)
class Config(cli.SetReadConfig):
  support: str = f("", "the distilled set in any format kip.io reads: ours, KIP/LS, "
                       "RFAD best.npz, FRePo dumps, DC/DSA/DM res_*.pt, MTT/DATM/PAD "
                       "images_best.pt, DC-Bench pairs")
  metrics: str = f("", "metrics.jsonl file(s), comma-separated, to plot test accuracy against step")
  out: str = f("", "PNG to write (default: grid.png or curve.png next to the input)")
  dataset: str = f("", "dataset of a released set, to refit its preprocessing (default: from "
                       "the file)")
  per_class: int = f(10, "images per row; a class with more wraps onto further rows",
                     minimum=1)
  projection: str = f("", "a KRR-ST set: also write this PNG, a PCA of its teacher's "
                          "representations of real training images (coloured by class) with "
                          "those of the set's images and its learned targets on top")
  manual_dir: str = f("", "offline: folder with <dataset>/ raw tfds files (or $KIP_MANUAL_DIR)")
  data_dir: str = f("", "where tfds keeps prepared datasets (or $KIP_DATA_DIR)")


def writable_output(out: str) -> str:
  """Makes `out`'s folder and checks that a file can be written there, before any slow work;
  raises cli.UserError with one line otherwise."""
  if os.path.isdir(out):
    raise cli.UserError(f"--out {out} is a folder; give a file name such as {out}/grid.png")
  folder = os.path.dirname(os.path.abspath(out))
  ancestor = folder
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise cli.UserError(f"cannot write {out}: {ancestor} is a file, not a folder")
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as e:
    raise cli.UserError(f"cannot write {out}: {e.strerror or e} ({folder})") from e
  return out


def show_set(config: Config) -> str:
  out = writable_output(config.out or os.path.join(os.path.dirname(config.support) or ".",
                                                   "grid.png"))
  with dataset_optional():  # a file that names no dataset is still drawn
    distilled = config.load(config.support, config.dataset or None)
  preprocessor = distilled.preprocessor
  dataset = config.dataset or distilled.dataset
  note = ""
  if preprocessor is None and dataset:
    from kip.pipeline import data_for_set  # noqa: PLC0415  (loads TF only when needed)

    try:  # the preprocessing is refitted on the real training split, when it is here
      preprocessor = data_for_set(distilled, dataset, data_dir=config.data_dir,
                                  manual_dir=config.manual_dir).preprocessor
    except DataError as e:
      cli.log(f"{dataset} is not here ({e}): drawing each image stretched to [0, 1]")
      note = " (not here: its preprocessing not undone)"
  if preprocessor is not None:
    images = preprocessor.invert(distilled.images)
  else:
    low = distilled.images.min(axis=(1, 2, 3), keepdims=True)
    high = distilled.images.max(axis=(1, 2, 3), keepdims=True)
    images = (distilled.images - low) / np.maximum(high - low, 1e-12)
    note += ", each image stretched to [0, 1]"
  n = len(distilled.images)
  title = (f"{os.path.basename(config.support)}: {n} images, {dataset or 'unknown dataset'}"
           f"{note}")
  if distilled.labels is not None:
    drawn = plot_image_grid(images, distilled.labels, out, per_class=config.per_class,
                            title=title)
  else:  # regression targets, no classes: one group, uncaptioned
    drawn = plot_image_grid(images, np.ones((n, 1)), out, per_class=config.per_class,
                            title=title + ", regression targets", class_names=[""],
                            captions=False)
  assert drawn == n, f"drew {drawn} of {n} images"
  if config.projection:
    show_projection(config, distilled)
  return out


def show_projection(config: Config, distilled) -> str:
  """KRR-ST's Figure 2 for `distilled` (a set with targets and the teacher that made them)."""
  out = writable_output(config.projection)
  teacher_path = distilled.meta.get("teacher")
  if distilled.targets is None or not teacher_path:
    lacks = "targets" if distilled.targets is None else "a teacher"
    raise cli.UserError(f"--projection needs a KRR-ST set; {config.support} has no {lacks}")
  from kip.pipeline import prepare_data  # noqa: PLC0415
  from methods.barlow import load_teacher  # noqa: PLC0415

  teacher = load_teacher(teacher_path)
  data = prepare_data(distilled.dataset, preprocessor=distilled.preprocessor,
                      data_dir=config.data_dir, manual_dir=config.manual_dir)
  pick = np.sort(np.random.default_rng(0).choice(len(data.x_train), 5000, replace=False))
  plot_projection(np.asarray(teacher.features(data.x_train[pick])), data.labels_train[pick],
                  np.asarray(teacher.features(distilled.images)), distilled.targets, out,
                  title=f"{os.path.basename(config.support)}: teacher representations, PCA of "
                  f"5,000 real {distilled.dataset} images")
  print(f"wrote {out}")
  return out


def show_metrics(config: Config) -> str:
  paths = [p.strip() for p in config.metrics.split(",") if p.strip()]
  curves = []
  for path in paths:
    if not os.path.exists(path):
      raise cli.UserError(f"{path}: no such file")
    try:
      curves.append(read_curve(path))
    except ValueError as e:
      raise cli.UserError(str(e)) from e
  out = writable_output(config.out or os.path.join(os.path.dirname(paths[0]) or ".",
                                                   "curve.png"))
  plot_curves(curves, out)
  return out


def run(config: Config, workdir: str, devices) -> list[str]:
  if bool(config.support) == bool(config.metrics):
    raise cli.UserError("give either a distilled set (FILE.npz) or --metrics FILE.jsonl")
  out = show_set(config) if config.support else show_metrics(config)
  return [f"wrote {out}"]


JOB = Job("show", Config, run, workdir=False, positional=("support",))
