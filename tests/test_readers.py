"""Other projects' distilled-set formats, read without PyTorch (kip/readers.py).

The `.pt` fixtures under fixtures/formats were written by real PyTorch (make_fixtures.py there),
in both torch.save formats, from NumPy generators that these tests draw again; ../shared/formats
holds files written by the DC and MTT code themselves.
"""

import json
import os
import pathlib
import pickle
import zipfile

import numpy as np
import pytest

from kip.data import fit_preprocessor
from kip.io import FileFormatError, load_distilled
from kip.readers import DC_STATS, PROTO_STATS, UnsafeFileError, read_torch, to_nhwc

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "formats"
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "formats"


def centred(ids, num_classes=10):
  return np.eye(num_classes)[ids] - 1.0 / num_classes


def dc_fixture_images():
  rng = np.random.default_rng(0)
  return [rng.standard_normal((10, 1, 28, 28)).astype(np.float32) for _ in range(2)]


@pytest.mark.parametrize("folder", ["", "legacy"])
def test_dc_results_file_in_both_torch_formats(folder):
  path = str(FIXTURES / folder / "res_DM_MNIST_ConvNet_1ipc.pt")
  first, last = dc_fixture_images()
  loaded = load_distilled(path, "mnist")  # the last experiment by default, NCHW -> NHWC
  np.testing.assert_array_equal(loaded.images, last.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(loaded.labels, centred(np.arange(10)), atol=1e-7)
  chosen = load_distilled(path, "mnist", experiment=0)
  np.testing.assert_array_equal(chosen.images, first.transpose(0, 2, 3, 1))
  source = loaded.source
  assert (source.method, source.dataset, source.net, source.ipc, source.experiment) == (
      "dm", "mnist", "ConvNet", 1, 1)
  assert source.published == {"ConvNet": [0.875, 0.9], "MLP": []}
  # DC's fixed statistics, known without the training data.
  np.testing.assert_array_equal(loaded.preprocessor.mean, [0.1307])
  np.testing.assert_array_equal(loaded.preprocessor.std, [0.3081])
  with pytest.raises(FileFormatError, match="experiment 2 asked for, the file has 2"):
    load_distilled(path, experiment=2)
  with pytest.raises(FileFormatError, match="made from mnist, not fashion_mnist"):
    load_distilled(path, "fashion_mnist")


def test_trajectory_pair_with_soft_logits_and_learned_lr():
  rng = np.random.default_rng(1)
  wide = rng.standard_normal((12, 1, 28, 56)).astype(np.float32)
  logits = rng.standard_normal((10, 10)).astype(np.float64) * np.float32(3)
  # images: a strided view at an offset into a larger storage; labels: the legacy format.
  loaded = load_distilled(str(FIXTURES / "mnist" / "images_best.pt"))
  np.testing.assert_array_equal(loaded.images, wide[2:, :, :, 1::2].transpose(0, 2, 3, 1))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(loaded.labels, probs / probs.sum(-1, keepdims=True), rtol=1e-5)
  assert float(loaded.extras["lr"]) == pytest.approx(0.0123)
  assert loaded.dataset == "mnist" and loaded.source.format == "pair"
  # The labels file names the same pair.
  same = load_distilled(str(FIXTURES / "mnist" / "labels_best.pt"))
  np.testing.assert_array_equal(same.images, loaded.images)


def test_files_written_by_the_dc_and_mtt_code():
  dc = load_distilled(str(SHARED / "dc" / "res_DC_FashionMNIST_ConvNet_1ipc.pt"))
  assert dc.images.shape == (10, 28, 28, 1) and dc.dataset == "fashion_mnist"
  np.testing.assert_array_equal(dc.labels.argmax(-1), np.arange(10))
  np.testing.assert_allclose(dc.preprocessor.mean, DC_STATS["fashion_mnist"][0])
  with pytest.raises(FileFormatError, match="does not say its dataset; give --dataset"):
    load_distilled(str(SHARED / "mtt" / "images_best.pt"))
  with pytest.raises(FileFormatError, match=r"mnist images are \(28, 28, 1\); give --dataset "
                     r"\(cifar10, svhn_cropped have such images\)$"):  # 10 classes
    load_distilled(str(SHARED / "mtt" / "images_best.pt"), "mnist")  # evaluate's default
  mtt = load_distilled(str(SHARED / "mtt" / "images_best.pt"), "cifar10")
  assert mtt.images.shape == (10, 32, 32, 3) and mtt.source.zca == "kornia_zca"
  assert mtt.preprocessor is None  # its ZCA is fitted on the real training split
  np.testing.assert_array_equal(mtt.labels.argmax(-1), np.arange(10))


def test_rfad_and_frepo_npz(tmp_path):
  rng = np.random.default_rng(2)
  images = rng.standard_normal((10, 1, 28, 28)).astype(np.float32)
  labels = rng.standard_normal((10, 10)).astype(np.float32)
  rfad = tmp_path / "rfad" / "mnist" / "10"
  rfad.mkdir(parents=True)
  np.savez(rfad / "best.npz", images=images, labels=labels, valid_loss=0.1, k=np.float32(0.3),
           jit=0.005, best_iter=7)
  loaded = load_distilled(str(rfad / "best.npz"))
  np.testing.assert_array_equal(loaded.images, images.transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(loaded.labels, labels)  # learned labels kept as they are
  assert float(loaded.extras["platt_scale"]) == pytest.approx(np.exp(0.3))
  assert loaded.preprocessor is None and loaded.source.stats is None  # training statistics
  nhwc = images.transpose(0, 2, 3, 1)
  for keys in (("image", "label"), ("x_proto", "y_proto")):
    path = tmp_path / f"frepo_fashion_mnist_{keys[0]}.npz"
    np.savez(path, **{keys[0]: nhwc, keys[1]: labels})
    frepo = load_distilled(str(path))
    np.testing.assert_array_equal(frepo.images, nhwc)
    np.testing.assert_array_equal(frepo.labels, labels)
    assert frepo.dataset == "fashion_mnist" and frepo.source.format == "npz_proto"
    np.testing.assert_array_equal(frepo.preprocessor.std, PROTO_STATS["fashion_mnist"][1])


def test_npy_pair_and_disagreements(tmp_path):
  images = np.zeros((20, 1, 28, 28), np.float32)
  np.save(tmp_path / "MNIST_IPC2_images.npy", images)
  np.save(tmp_path / "MNIST_IPC2_labels.npy", np.repeat(np.arange(10), 2))
  loaded = load_distilled(str(tmp_path / "MNIST_IPC2_images.npy"))
  assert loaded.images.shape == (20, 28, 28, 1) and loaded.source.ipc == 2
  np.testing.assert_allclose(loaded.labels, centred(np.repeat(np.arange(10), 2)), atol=1e-7)
  cases = {
      "MNIST_IPC1": (images, np.repeat(np.arange(10), 2), "name says 1 per class .* holds 20"),
      "MNIST_a": (images, np.arange(10), "20 images but 10 labels"),
      "MNIST_b": (images, images, "holds images .* not labels"),
      "MNIST_c": (images, np.full(20, 11), r"class ids lie in \[11, 11\], outside \[0, 10\)"),
  }
  for stem, (x, y, message) in cases.items():
    np.save(tmp_path / f"{stem}_images.npy", x)
    np.save(tmp_path / f"{stem}_labels.npy", y)
    with pytest.raises(FileFormatError, match=message) as error:
      load_distilled(str(tmp_path / f"{stem}_images.npy"))
    assert stem in str(error.value)  # the line names the file
  with pytest.raises(FileFormatError, match="its labels file .* does not exist"):
    np.save(tmp_path / "lonely_images.npy", x)
    load_distilled(str(tmp_path / "lonely_images.npy"), "mnist")
  # An `images_<name>.npy` pair is another code's export (the DM runner's), not MTT's
  # torch.save files: DC-normalised, no whitening even on colour data.
  colour = np.zeros((10, 3, 32, 32), np.float32)
  np.save(tmp_path / "images_dm_cifar10.npy", colour)
  np.save(tmp_path / "labels_dm_cifar10.npy", np.arange(10))
  pair = load_distilled(str(tmp_path / "images_dm_cifar10.npy"))
  assert (pair.source.method, pair.source.zca, pair.dataset) == (None, None, "cifar10")


def test_layout_detection_and_override():
  x = np.arange(2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
  np.testing.assert_array_equal(to_nhwc(x, "auto", "f"), np.moveaxis(x, 1, -1))
  nhwc = np.zeros((2, 28, 28, 1))
  assert to_nhwc(nhwc, "auto", "f").shape == (2, 28, 28, 1)
  assert to_nhwc(np.zeros((2, 1, 28, 28)), "auto", "f").shape == (2, 28, 28, 1)
  ambiguous = np.zeros((2, 3, 8, 3))
  with pytest.raises(FileFormatError, match="--layout"):
    to_nhwc(ambiguous, "auto", "f")
  assert to_nhwc(ambiguous, "nchw", "f").shape == (2, 8, 3, 3)
  assert to_nhwc(ambiguous, "nhwc", "f").shape == (2, 3, 8, 3)


class _Payload:
  """Pickles as a call of os.system: what a hostile .pt file would run on load."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_crafted_pt_files_are_refused_before_anything_runs(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"data": _Payload(marker)}, protocol=2)
  zipped = tmp_path / "images_best.pt"
  with zipfile.ZipFile(zipped, "w") as archive:
    archive.writestr("archive/data.pkl", payload)
    archive.writestr("archive/version", "3\n")
  legacy = tmp_path / "res_DC_MNIST_ConvNet_1ipc.pt"
  legacy.write_bytes(payload)
  for path in (zipped, legacy):
    with pytest.raises(UnsafeFileError, match=r"refused: the pickle asks for posix\.system|"
                                              r"refused: the pickle asks for os\.system"):
      read_torch(str(path))
  assert not marker.exists()
  (tmp_path / "labels_best.pt").write_bytes(zipped.read_bytes())
  with pytest.raises(UnsafeFileError):
    load_distilled(str(zipped), "mnist")
  assert not marker.exists()


def test_not_a_torch_file(tmp_path):
  path = tmp_path / "images_best.pt"
  path.write_bytes(b"\x00\x01 not a pickle")
  with pytest.raises(FileFormatError, match="not a readable torch.save file"):
    read_torch(str(path))


def test_kornia_zca_against_numpy():
  """MTT's ZCA: fixed statistics, the unbiased covariance, absolute eps 0.1."""
  rng = np.random.default_rng(3)
  pixels = rng.integers(0, 256, (40, 4, 4, 1)).astype(np.uint8)
  stats = ((0.5,), (0.25,))
  pre = fit_preprocessor(pixels, zca=True, zca_layer_norm=False, stats=stats, zca_eps=0.1)
  x = ((pixels / 255.0 - 0.5) / 0.25).reshape(40, -1)
  centred_x = x - x.mean(0)
  cov = centred_x.T @ centred_x / 39
  u, s, _ = np.linalg.svd(cov)
  whiten = u @ np.diag(1 / np.sqrt(s + 0.1)) @ u.T
  np.testing.assert_allclose(pre.apply(pixels).reshape(40, -1), centred_x @ whiten, rtol=1e-4,
                             atol=1e-5)
  assert pre.name == "standardize+kornia_zca"


@pytest.mark.slow
def test_real_dc_set_evaluates_and_importers_feed_every_command(tmp_path, manual_dir, data_dir,
                                                                run_in_process):
  """DC's own 1-image-per-class Fashion-MNIST set, read from its .pt and scored by KRR on the
  real test split in DC's normalisation: well above chance (10%)."""
  dc = str(SHARED / "dc" / "res_DC_FashionMNIST_ConvNet_1ipc.pt")
  out = run_in_process("experiments.evaluate", "--support", dc, "--dataset", "fashion_mnist",
                       "--manual-dir", manual_dir, "--data-dir", data_dir, "--json-out")
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)["test_acc"] > 0.35
  grid = tmp_path / "grid.png"
  shown = run_in_process("experiments.show", dc, "--out", str(grid))
  assert shown.returncode == 0, shown.stderr
  assert grid.stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["rfad", "frepo", "pair"])
def test_real_images_in_each_format_score_as_real_images(family, tmp_path, mnist, data_dir,
                                                         run_in_process):
  """10 real MNIST images per class written as each family writes them (its layout, label form
  and preprocessing): the KRR test accuracy is that of real images, so the reader recovered the
  images, labels and the real splits' preprocessing (as test_cli's released-layout test)."""
  from kip.data import class_balanced_indices

  train = mnist["train"]
  idx = class_balanced_indices(train.labels, 10, np.random.default_rng(0))
  pixels, ids = train.images[idx] / 255.0, train.labels[idx]
  if family == "rfad":
    pre = fit_preprocessor(train.images)
    x = ((pixels - pre.mean) / pre.std).transpose(0, 3, 1, 2)
    path = tmp_path / "mnist" / "best.npz"
    path.parent.mkdir()
    np.savez(path, images=x, labels=centred(ids), k=np.float32(0), jit=0.005)
  elif family == "frepo":
    path = tmp_path / "frepo_mnist.npz"
    np.savez(path, image=(pixels - 0.1307) / 0.3081, label=centred(ids))
  else:
    path = tmp_path / "MNIST_IPC10_images.npy"
    np.save(path, ((pixels - 0.1307) / 0.3081).transpose(0, 3, 1, 2).astype(np.float32))
    np.save(tmp_path / "MNIST_IPC10_labels.npy", ids.astype(np.int64))
  out = run_in_process("experiments.evaluate", "--support", str(path), "--dataset", "mnist",
                       "--data-dir", data_dir, "--json-out")
  assert out.returncode == 0, out.stderr
  assert 0.6 < json.loads(out.stdout)["test_acc"] < 0.9


def test_a_tensor_reaching_outside_its_storage_is_refused():
  from kip.readers import _Tensors

  storage = np.arange(10, dtype=np.float32)
  tensors = _Tensors("f")
  tensors.add("0", storage)
  _rebuild_tensor = tensors.rebuild
  np.testing.assert_array_equal(_rebuild_tensor(storage, 2, (2, 3), (3, 1)),
                                [[2, 3, 4], [5, 6, 7]])
  for offset, size, stride in ((2, (3, 3), (3, 1)), (0, (2,), (-1,)), (-1, (2,), (1,))):
    with pytest.raises(FileFormatError, match="storage"):
      _rebuild_tensor(storage, offset, size, stride)


def test_evaluate_says_why_a_method_kernel_set_scores_differently():
  """A FRePo set records its own kernel (its pool networks' features, not in the file): evaluate
  says so and which kernel it uses instead; a set with no kernel at all gets the short note."""
  from evaluation.evaluate import Config, resolve_kernel
  from kip.io import DistilledSet

  images, labels = np.zeros((10, 28, 28, 1), np.float32), np.eye(10, dtype=np.float32)
  frepo = DistilledSet(images, labels, meta={"method": "frepo", "kernel": "frepo-pool"})
  config, note = resolve_kernel(Config(support="x.npz"), frepo)
  assert config.kernel == "fc"
  assert "frepo's own kernel (frepo-pool)" in note and "not the one frepo reported" in note
  config, note = resolve_kernel(Config(support="x.npz"), DistilledSet(images, labels))
  assert config.kernel == "fc" and note == "the file records no kernel: using fc"
