"""Pictures people would rather look at than read: a distilled set as an image grid (rows by
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

__all__ = ["Curve", "read_curve", "plot_curves", "make_image_grid", "plot_image_grid",
           "save_figure", "pca_2d", "plot_projection", "plot_panels", "plot_confusion",
           "confusion_matrix"]


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


def make_image_grid(images: np.ndarray, labels: np.ndarray, *, per_class: int = 10,
                    title: str = "", class_names: Sequence[str] | None = None,
                    captions: bool = True):
  """A figure with every image, grouped in rows by class (the argmax of its label).

  Each class starts a new row (class 0 first); a class with more than `per_class` images wraps
  onto further rows, so nothing is left out. The figure is at least as wide as its title. The
  images are tiled into one picture on a white ground (one matplotlib image, not an axes per
  image: a 1,000-image grid draws in about a second instead of a minute).

  Args:
    images: (n, H, W, C) float in [0, 1] (already mapped back from preprocessed space; values
      outside are clipped).
    labels: (n, num_classes) float; each image is captioned with its label's largest value
      (unless `captions` is False).
    per_class: images per row.

  Returns:
    The matplotlib Figure (not yet saved).
  """
  return _image_grid(images, labels, per_class, title, class_names, captions)[0]


CAPTION_NOTE = ("number above an image: its label's value for its row's class "
                "(one-hot 1, centred one-hot 1 - 1/classes; learned labels differ)")


def _image_grid(images, labels, per_class, title, class_names, captions):
  """`make_image_grid`'s figure and the number of images placed in it."""
  images, labels = np.asarray(images), np.asarray(labels)
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  num_classes = labels.shape[1]
  classes = labels.argmax(1)
  counts = np.bincount(classes, minlength=num_classes)
  columns = max(1, min(per_class, int(counts.max(initial=0))))
  # (class, first image's position among the class) per row; an empty class keeps its own row.
  rows = [(c, start) for c in range(num_classes)
          for start in range(0, max(int(counts[c]), 1), columns)]
  height, width = images.shape[1:3]
  gap = max(1, round(0.12 * max(height, width)))  # white space between images, in pixels
  band = round(0.4 * height) if captions else 0  # room for a caption above each image
  cell_h, cell_w = band + height + gap, width + gap
  canvas = np.ones((len(rows) * cell_h, columns * cell_w - gap, 3), np.float32)
  fig, ax = plt.subplots(figsize=(1.1 * columns + 0.3, 1.2 * len(rows)), dpi=100)
  placed = 0
  for r, (c, start) in enumerate(rows):
    top = r * cell_h + band  # the row's first image pixel
    name = class_names[c] if class_names else str(c)
    if start == 0:
      ax.text(-gap, top + (height - 1) / 2, name, ha="right", va="center")
    else:  # a class longer than a row goes on here: said, so it is not read as the next class
      ax.text(-gap, top + (height - 1) / 2, f"{name} (cont.)" if name else "(cont.)",
              ha="right", va="center", fontsize=7, color="0.45")
    for j, i in enumerate(np.flatnonzero(classes == c)[start:start + columns]):
      left = j * cell_w
      canvas[top:top + height, left:left + width] = np.clip(images[i], 0, 1)  # gray: to 3
      placed += 1
      if captions:
        ax.text(left + (width - 1) / 2, top - 0.5, f"{labels[i, c]:.2f}", fontsize=7,
                ha="center", va="bottom")
  ax.imshow(canvas, interpolation="nearest")
  ax.axis("off")
  pad = 0.08 / fig.get_figheight()  # inches, as a fraction of the height

  def room(text) -> float:
    """Widens the figure to `text` and returns the fraction of its height the text and its
    padding take (tight_layout alone lets a title overlap the first row's captions)."""
    extent = text.get_window_extent(fig.canvas.get_renderer())
    fig.set_figwidth(max(fig.get_figwidth(), extent.width / fig.dpi + 0.3))
    return 2 * pad + extent.height / fig.dpi / fig.get_figheight()

  bottom = room(fig.text(0.5, pad, CAPTION_NOTE, fontsize=7, ha="center", va="bottom",
                         color="0.3")) if captions else 0.0
  top = 1.0 - room(fig.suptitle(title, fontsize=9, y=1.0 - pad, va="top")) if title else 1.0
  fig.tight_layout(rect=(0, bottom, 1, top))
  return fig, placed


def plot_image_grid(images: np.ndarray, labels: np.ndarray, path: str, *, per_class: int = 10,
                    title: str = "", class_names: Sequence[str] | None = None,
                    captions: bool = True) -> int:
  """Writes `make_image_grid`'s figure to `path` as PNG; returns the number of images drawn."""
  fig, placed = _image_grid(images, labels, per_class, title, class_names, captions)
  save_figure(fig, path)
  return placed


def pca_2d(reference: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Projects `reference` (n, d) and each of `others` (m, d) on the first two principal axes of
  `reference` (centred on its mean): a list of (n, 2) then (m, 2) arrays."""
  reference = np.asarray(reference, np.float64)
  mean = reference.mean(0)
  _, _, vt = np.linalg.svd(reference - mean, full_matrices=False)
  axes = vt[:2].T
  return [(np.asarray(a, np.float64) - mean) @ axes for a in (reference, *others)]


def plot_projection(real: np.ndarray, real_labels: np.ndarray, image_reps: np.ndarray,
                    targets: np.ndarray, path: str, *, title: str = "") -> None:
  """KRR-ST's Figure 2: a PCA of a teacher's representations of real images (`real` (n, d),
  coloured by `real_labels` (n,), which only colour the plot), with the teacher's representations
  of the distilled images (`image_reps` (m, d)) and the set's learned targets (`targets` (m, d))
  on top, each distilled image's pair joined by a line."""
  p_real, p_images, p_targets = pca_2d(real, image_reps, targets)
  fig, ax = plt.subplots(figsize=(7, 6))
  scatter = ax.scatter(p_real[:, 0], p_real[:, 1], c=real_labels, cmap="tab10", s=3, alpha=0.35)
  for a, b in zip(p_images, p_targets, strict=True):
    ax.plot([a[0], b[0]], [a[1], b[1]], color="0.5", linewidth=0.5)
  marks = [ax.scatter(p_images[:, 0], p_images[:, 1], marker="o", facecolors="none",
                      edgecolors="k", s=30, label="teacher(distilled image)"),
           ax.scatter(p_targets[:, 0], p_targets[:, 1], marker="x", c="r", s=30,
                      label="learned target")]
  ax.add_artist(ax.legend(*scatter.legend_elements(), loc="lower right", fontsize=7,
                          title="class"))
  ax.legend(handles=marks, loc="upper left", fontsize=8)
  ax.set_xlabel("PC 1")
  ax.set_ylabel("PC 2")
  ax.set_title(title or "teacher representations (PCA of the real images')")
  fig.tight_layout()
  save_figure(fig, path)


def plot_panels(x: np.ndarray, series: dict[str, np.ndarray], path: str, *,
                xlabel: str = "epoch", title: str = "", columns: int = 3) -> None:
  """One small panel per named series against `x` (each on its own scale)."""
  rows = -(-len(series) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), dpi=110,
                           squeeze=False)
  for ax in axes.ravel()[len(series):]:
    ax.axis("off")
  for ax, (name, values) in zip(axes.ravel(), series.items(), strict=False):
    ax.plot(x, values, marker=".", markersize=3)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()) if title else None)
  save_figure(fig, path)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """(num_classes, num_classes) counts: row = true class, column = predicted class."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
  return matrix


def plot_confusion(matrix: np.ndarray, path: str, *, title: str = "",
                   class_names: Sequence[str] | None = None) -> None:
  """A confusion matrix (rows: true class, columns: predicted), counts written in the cells."""
  n = len(matrix)
  names = list(class_names) if class_names else [str(i) for i in range(n)]
  fig, ax = plt.subplots(figsize=(0.5 * n + 2, 0.5 * n + 1.6), dpi=110)
  ax.imshow(matrix, cmap="Blues")
  threshold = matrix.max() / 2 if matrix.size else 0
  for i in range(n):
    for j in range(n):
      ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
              color="white" if matrix[i, j] > threshold else "black")
  ax.set_xticks(range(n), names, fontsize=8)
  ax.set_yticks(range(n), names, fontsize=8)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  save_figure(fig, path)
