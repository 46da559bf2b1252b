"""`kip.plots`' image grid and `experiments.show`: every image is drawn, the title fits, and an
unwritable --out ends in one line."""

import pathlib
import tempfile

import numpy as np
import pytest
from conftest import run_cli

from evaluation.show import writable_output
from experiments import show
from kip import cli
from kip.io import DistilledSet, save_distilled
from kip.plots import make_image_grid, plot_image_grid


def _learned_set(counts, seed=0):
  """Images i filled with the value i / n (so a drawn image tells which it is) and soft labels
  whose argmax has `counts[c]` images of class c, shuffled."""
  n, num_classes = sum(counts), len(counts)
  rng = np.random.default_rng(seed)
  classes = rng.permutation(np.repeat(np.arange(num_classes), counts))
  labels = rng.normal(0, 0.05, size=(n, num_classes))
  labels[np.arange(n), classes] = rng.uniform(0.5, 1.0, size=n)
  images = np.broadcast_to((np.arange(n) / n)[:, None, None, None], (n, 6, 6, 1)).copy()
  return images, labels, classes


def _cells(fig):
  """The grid's picture cut into cells along its all-white rows and columns: a list of rows,
  each a list of the row's (h, w) cells, blank ones included (the test images are never white)."""
  (ax,) = fig.axes
  (picture,) = ax.images
  gray = np.asarray(picture.get_array())[..., 0]

  def bands(inked):  # runs of True: [(start, stop), ...]
    edges = np.flatnonzero(np.diff(np.concatenate([[0], inked.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2], strict=True))

  columns = bands((gray < 1).any(0))
  return [[gray[r0:r1, c0:c1] for c0, c1 in columns] for r0, r1 in bands((gray < 1).any(1))]


def _drawn_ids(fig, n):
  """The images drawn, in row-major order (an image i is filled with the value i / n)."""
  return [int(round(float(cell.mean()) * n)) for row in _cells(fig) for cell in row
          if (cell < 1).all()]


@pytest.mark.parametrize("per_class", [10, 4])
def test_grid_draws_every_image_of_an_unbalanced_set(per_class):
  counts = [19, 1, 12, 10, 9, 10, 10, 10, 9, 10]  # argmax of learned labels: not 10 per class
  images, labels, classes = _learned_set(counts)
  fig = make_image_grid(images, labels, per_class=per_class, title="100 images")
  # Every image, once, grouped by class (class 0 first) in the set's own order within a class.
  assert _drawn_ids(fig, 100) == np.argsort(classes, kind="stable").tolist()
  cells = _cells(fig)
  rows = sum(-(-c // per_class) for c in counts)  # classes longer than a row wrap
  assert len(cells) == rows and {len(row) for row in cells} == {per_class}
  for row in cells:  # the images fill each row from its left
    drawn = [bool((cell < 1).all()) for cell in row]
    assert drawn == sorted(drawn, reverse=True) and all((cell < 1).all() or (cell == 1).all()
                                                        for cell in row)


def test_plot_image_grid_writes_the_file_and_counts(tmp_path):
  images, labels, _ = _learned_set([19, 1, 12, 10, 9, 10, 10, 10, 9, 10])
  assert plot_image_grid(images, labels, str(tmp_path / "g.png"), per_class=10) == 100
  assert (tmp_path / "g.png").stat().st_size > 1000


@pytest.mark.parametrize("counts", [[1] * 10, [19, 1, 12, 10, 9, 10, 10, 10, 9, 10]])
def test_title_fits_in_the_figure_above_the_grid(counts):
  images, labels, _ = _learned_set(counts)
  title = f"ConvNet_ssize{sum(counts)}_zca_l_noaug_ckpt1000.npz: {sum(counts)} images, mnist"
  fig = make_image_grid(images, labels, title=title)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  (text,) = [t for t in fig.texts if t.get_text() == title]
  box, page = text.get_window_extent(renderer), fig.bbox
  assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
  (grid,) = fig.axes  # the picture with its captions and class names
  assert box.y0 >= grid.get_tightbbox(renderer).y1  # clear of the grid


def test_show_draws_a_set_with_regression_targets(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "targets.npz"
  save_distilled(str(path), DistilledSet(rng.normal(size=(7, 6, 6, 1)).astype(np.float32), None,
                                         {"step": 0}, targets=rng.normal(size=(7, 3))))
  assert show.main([str(path), "--out", str(tmp_path / "t.png")]) == 0
  assert (tmp_path / "t.png").stat().st_size > 1000


def test_unwritable_out_is_one_line(tmp_path, monkeypatch):
  images, labels, _ = _learned_set([1] * 10)
  support = tmp_path / "set.npz"
  np.savez(support, images=images.astype(np.float32), labels=labels.astype(np.float32))
  (tmp_path / "file.txt").write_text("not a folder")
  done = run_cli("experiments.show", str(support), "--out", str(tmp_path / "file.txt" / "g.png"))
  assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
  assert done.stderr.strip().splitlines() == [
      f"error: cannot write {tmp_path}/file.txt/g.png: {tmp_path}/file.txt is a file, not a "
      "folder"]
  with pytest.raises(cli.UserError, match="is a folder; give a file name"):
    writable_output(str(tmp_path))

  def refused(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(tempfile, "TemporaryFile", refused)  # root may write anywhere
  with pytest.raises(cli.UserError, match=r"cannot write .*g\.png: Permission denied \("):
    writable_output(str(tmp_path / "locked" / "g.png"))


def test_a_wrapped_row_says_it_goes_on_and_the_captions_are_explained():
  from kip.plots import CAPTION_NOTE

  images, labels, _ = _learned_set([12, 1, 1, 1, 1, 1, 1, 1, 1, 1])
  fig = make_image_grid(images, labels, per_class=10, title="20 images")
  (ax,) = fig.axes
  names = [t.get_text() for t in ax.texts if t.get_horizontalalignment() == "right"]
  assert names == ["0", "0 (cont.)", *map(str, range(1, 10))]  # class 0 wraps onto a 2nd row
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  (note,) = [t for t in fig.texts if t.get_text() == CAPTION_NOTE]
  box = note.get_window_extent(renderer)
  assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y0 >= fig.bbox.y0
  assert box.y1 <= ax.get_tightbbox(renderer).y0  # below the grid, clear of it
  bare = make_image_grid(images, labels, per_class=10, captions=False)
  assert not [t for t in bare.texts if t.get_text() == CAPTION_NOTE]


SHARED_FORMATS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "formats"


@pytest.mark.parametrize("fmt", ["mtt", "rfad"])
def test_show_draws_a_cifar_set_with_no_cifar_here(tmp_path, monkeypatch, fmt):
  """An MTT `images_best.pt` (CIFAR-10, ZCA space, names no dataset) and an RFAD-format
  `best.npz` (CIFAR-shaped): drawn with each image stretched, said in the title, whether the
  dataset is left out or named but not on this machine."""
  import shutil

  import evaluation.show

  if fmt == "mtt":
    support = tmp_path / "images_best.pt"
    for name in ("images_best.pt", "labels_best.pt"):
      shutil.copy(SHARED_FORMATS / "mtt" / name, tmp_path / name)
  else:
    support = tmp_path / "best.npz"
    rng = np.random.default_rng(0)
    np.savez(support, images=rng.normal(size=(10, 3, 32, 32)).astype(np.float32),
             labels=np.eye(10, dtype=np.float32), k=np.float32(2.0), jit=np.float32(1e-6))
  drawn = []
  real = evaluation.show.plot_image_grid
  monkeypatch.setattr(evaluation.show, "plot_image_grid",
                      lambda images, *a, **kw: drawn.append((images, kw["title"])) or
                      real(images, *a, **kw))
  empty = tmp_path / "manual"
  empty.mkdir()
  assert show.main([str(support), "--out", str(tmp_path / "a.png")]) == 0
  assert show.main([str(support), "--dataset", "cifar10", "--manual-dir", str(empty),
                    "--data-dir", str(tmp_path / "tfds"), "--out", str(tmp_path / "b.png")]) == 0
  (bare, bare_title), (named, named_title) = drawn
  assert bare.shape == named.shape == (10, 32, 32, 3)
  assert bare_title.endswith("unknown dataset, each image stretched to [0, 1]"), bare_title
  assert named_title.endswith("cifar10 (not here: its preprocessing not undone), each image "
                              "stretched to [0, 1]"), named_title
  for images in (bare, named):  # each image spans [0, 1] on its own
    np.testing.assert_allclose(images.min(axis=(1, 2, 3)), 0, atol=1e-6)
    np.testing.assert_allclose(images.max(axis=(1, 2, 3)), 1, atol=1e-6)
  assert (tmp_path / "a.png").stat().st_size > 1000 and (tmp_path / "b.png").exists()
