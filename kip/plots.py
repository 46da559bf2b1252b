"""Pictures people would rather look at than read: a distilled set as an image grid (one row per
class, mapped back from preprocessed space), and test accuracy against step for one or more runs.

Figures are drawn with matplotlib's Agg backend and written atomically as PNG.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kip.io import atomic_write  # noqa: E402
from kip.loop import read_metrics  # noqa: E402

__all__ = ["Curve", "read_curve", "plot_curves", "plot_image_grid", "save_figure"]


class Curve(NamedTuple):
  """steps: (n,); mean: (n,) accuracy in [0, 1]; std: (n,) across seeds, or None."""

  label: str
  steps: np.ndarray
  mean: np.ndarray
  std: np.ndarray | None = None


def read_curve(metrics_path: str, label: str | None = None) -> Curve:
  """The test-accuracy records of a metrics.jsonl: a KIP run's (`test_acc` a number) or a
  transfer row's (`test_acc` a list over seeds)."""
  evals = [r for r in read_metrics(metrics_path) if "test_acc" in r]
  if not evals:
    raise ValueError(f"{metrics_path}: no test_acc records")
  steps = np.array([r["step"] for r in evals])
  accs = [np.atleast_1d(np.asarray(r["test_acc"], np.float64)) for r in evals]
  mean = np.array([a.mean() for a in accs])
  std = np.array([a.std() for a in accs]) if max(len(a) for a in accs) > 1 else None
  if label is None:  # e.g. "transfer-mnist-convnet/random": the run and the row
    folders = os.path.dirname(os.path.abspath(metrics_path)).split(os.sep)
    label = "/".join(folders[-2:])
  return Curve(label, steps, mean, std)


def save_figure(fig, path: str) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  plt.close(fig)
  atomic_write(path, buffer.getvalue())


def plot_curves(curves: Sequence[Curve], path: str, *, xlabel: str = "step",
                ylabel: str = "test accuracy (%)", title: str = "",
                log_x: bool = False) -> None:
  """Accuracy (%) against step, one line per curve, a +-1 std band where seeds were averaged."""
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  for curve in curves:
    (line,) = ax.plot(curve.steps, 100 * curve.mean, label=curve.label, marker=".")
    if curve.std is not None:
      ax.fill_between(curve.steps, 100 * (curve.mean - curve.std),
                      100 * (curve.mean + curve.std), color=line.get_color(), alpha=0.2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if log_x:
    ax.set_xscale("symlog", linthresh=100)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  save_figure(fig, path)


def plot_image_grid(images: np.ndarray, labels: np.ndarray, path: str, *, per_class: int = 10,
                    title: str = "", class_names: Sequence[str] | None = None) -> None:
  """One row per class (by the label's argmax), up to `per_class` images each.

  Args:
    images: (n, H, W, C) float in [0, 1] (already mapped back from preprocessed space).
    labels: (n, num_classes) float; each image is captioned with its label's largest value.
  """
  num_classes = labels.shape[1]
  classes = labels.argmax(1)
  columns = max(1, min(per_class, int(np.bincount(classes, minlength=num_classes).max())))
  fig, axes = plt.subplots(num_classes, columns, figsize=(1.1 * columns, 1.2 * num_classes),
                           dpi=100, squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for c in range(num_classes):
    members = np.flatnonzero(classes == c)[:columns]
    name = class_names[c] if class_names else str(c)
    axes[c, 0].text(-0.15, 0.5, name, transform=axes[c, 0].transAxes, ha="right", va="center")
    for j, i in enumerate(members):
      image = images[i]
      axes[c, j].imshow(image[..., 0] if image.shape[-1] == 1 else image,
                        cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=1)
      axes[c, j].set_title(f"{labels[i, c]:.2f}", fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  save_figure(fig, path)
