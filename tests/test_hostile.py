"""Hostile and damaged files: memory bounded by the file, one line instead of a traceback, nothing
accepted silently (kip/readers.py, kip/io.py, kip/files.py).

Every file here is written by the tests (`torchfiles` spells torch.save pickles opcode by opcode;
no PyTorch). A bad file must give exit 2 and one line `error: ...` from the commands that read
sets, without a traceback; a file that claims gigabytes from a few bytes must be refused within a
few hundred MB of peak memory, measured in a fresh process.
"""

import errno
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torchfiles as tf
from conftest import ROOT

from kip.cli import file_digest
from kip.files import atomic_write
from kip.io import FileFormatError, load_distilled
from kip.readers import UnsafeFileError, read_torch

GIB = 2**30
MNIST_LABELS = np.eye(10, dtype=np.float32)[np.arange(10)] - 0.1


def honest_images(n=10):
  return np.random.default_rng(0).standard_normal((n, 28, 28, 1)).astype(np.float32)


def pair(tmp_path, images_obj, storages, labels=None, compress=None):
  """An MTT-style `images_best.pt` (zip format) beside honest labels (default: one per class);
  returns the images path."""
  labels = np.arange(10) if labels is None else labels
  labels_tensor, labels_raw = tf.tensor("0", np.asarray(labels, np.int64))
  tf.write_zip(tmp_path / "labels_best.pt", labels_tensor, {"0": labels_raw})
  path = tmp_path / "images_best.pt"
  tf.write_zip(path, images_obj, storages, compress)
  return path


def ours(tmp_path, name="distilled.npz", **changes):
  """Our `distilled.npz` for MNIST (10 images, learned labels, standardised) with `changes`
  (None deletes a key)."""
  arrays = {"images": honest_images(), "labels": MNIST_LABELS, "dataset": np.asarray("mnist"),
            "step": np.asarray(5), "config": np.asarray(json.dumps({"ipc": 1})),
            "preprocessing": np.asarray("standardize"), "pre_mean": np.asarray([0.13]),
            "pre_std": np.asarray([0.31])}
  for key, value in changes.items():
    if value is None:
      arrays.pop(key)
    else:
      arrays[key] = value
  path = tmp_path / name
  atomic_write(str(path), arrays)
  return path


def add_bomb(path, key="unused", size=GIB, header_shape=None):
  """Appends to an .npz an entry `key` whose .npy header declares `header_shape` float32 values
  (default: as many as `size` bytes hold) followed by `size` zero bytes, deflated: a few MB on
  disk."""
  import io

  header = io.BytesIO()
  shape = header_shape or (size // 4,)
  np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                "shape": shape})
  chunk = bytes(16 * 2**20)
  with zipfile.ZipFile(path, "a") as archive:
    info = zipfile.ZipInfo(key + ".npy")
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, "w", force_zip64=True) as f:
      f.write(header.getvalue())
      for start in range(0, size, len(chunk)):
        f.write(chunk[: size - start])


# ------------------------------------------------------------------------------------------------
# Memory bounded by the file

PEAK_SCRIPT = """
import json, resource, sys
from kip.io import FileFormatError, load_distilled

def hwm():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024

try:  # resets the high-water mark to what is resident now (Linux)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  before = hwm()
except OSError:
  before = hwm()
try:
  d = load_distilled(sys.argv[1], "mnist")
  outcome = f"read {d.images.shape}"
except FileFormatError as e:
  outcome = str(e)
print(json.dumps({"outcome": outcome, "peak_mib": hwm() - before}))
"""


def peak_of_reading(path) -> dict:
  """Reads `path` with `load_distilled` in a fresh process: the outcome (the error's line, or
  what was read) and how far the peak resident memory rose above what the imports left."""
  out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], cwd=ROOT, text=True,
                       capture_output=True, timeout=300)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
  """Each memory probe of issue 38 as a file of a few MB."""
  folder = tmp_path_factory.mktemp("bombs")
  made = {}
  # A storage entry that inflates to 1 GiB while its tensor declares 7,840 floats.
  small = tf.Tensor(tf.Storage("0", np.float32, 7840), 0, (10, 1, 28, 28), (784, 784, 28, 1))
  (folder / "a").mkdir()
  made["pt_entry_larger_than_tensor"] = pair(
      folder / "a", small, {"0": (bytes(16 * 2**20), GIB // (16 * 2**20))}, compress={"0"})
  # The same entry, its tensor declaring all of it: refused by what the file may inflate to.
  honest_claim = tf.Tensor(tf.Storage("0", np.float32, GIB // 4), 0, (GIB // 3136, 1, 28, 28),
                           (784, 784, 28, 1))
  (folder / "b").mkdir()
  made["pt_zip_bomb"] = pair(folder / "b", honest_claim,
                             {"0": (bytes(16 * 2**20), GIB // (16 * 2**20))}, compress={"0"})
  # 700 bytes: stride 0 over a 4-byte storage, shape (480000, 1, 28, 28).
  (folder / "c").mkdir()
  made["pt_stride_zero"] = pair(
      folder / "c", tf.Tensor(tf.Storage("0", np.float32, 1), 0, (480000, 1, 28, 28),
                              (0, 0, 0, 0)), {"0": bytes(4)}, labels=np.arange(480000) % 10)
  # One storage viewed 20,000 times (each view legal alone).
  (folder / "d").mkdir()
  view = tf.Tensor(tf.Storage("0", np.float32, 7840), 0, (10, 1, 28, 28), (784, 784, 28, 1))
  made["pt_views_of_one_storage"] = pair(folder / "d", {"x": [view] * 15000},
                                         {"0": bytes(31360)})
  # Our npz with an unused key that inflates to 1 GiB: read fine, the key never inflated.
  made["npz_unused_bomb"] = ours(folder, "unused.npz")
  add_bomb(made["npz_unused_bomb"])
  # The same bomb under a key that is read (an extra).
  made["npz_used_bomb"] = ours(folder, "used.npz")
  add_bomb(made["npz_used_bomb"], key="extra_lr")
  # A header declaring 1 GiB over 4 bytes of data.
  made["npz_header_lies"] = ours(folder, "lies.npz")
  add_bomb(made["npz_header_lies"], key="extra_lr", size=4, header_shape=(GIB // 4,))
  return made


MEMORY_CASES = {
    "pt_entry_larger_than_tensor": r"storage 0 holds 1,073,741,824 bytes where its 7,840 "
                                   r"float32 elements take 31,360",
    "pt_zip_bomb": r"refused: entry archive/data/0 inflates to 1,073,741,824 bytes",
    "pt_stride_zero": r"a tensor of shape \(480000, 1, 28, 28\) \(376,320,000 elements\) over "
                      r"1 elements of its storage",
    "pt_views_of_one_storage": r"its tensors hold more elements than its storages",
    "npz_unused_bomb": r"read \(10, 28, 28, 1\)",
    "npz_used_bomb": r"refused: entry extra_lr.npy inflates to",
    "npz_header_lies": r"entry extra_lr: declares shape \(268435456,\) of float32 "
                       r"\(1,073,741,824 bytes\) but holds 4 bytes",
}


@pytest.mark.parametrize("case", sorted(MEMORY_CASES))
def test_memory_is_bounded_by_the_file_not_by_its_claims(case, bombs):
  import re

  path = bombs[case]
  assert os.path.getsize(path) < 3 * 2**20  # every probe is under 3 MB on disk
  result = peak_of_reading(path)
  assert re.search(MEMORY_CASES[case], result["outcome"]), result["outcome"]
  assert result["peak_mib"] < 300, result


# ------------------------------------------------------------------------------------------------
# One line, not a traceback

def legacy_images(tmp_path, **kw):
  """A legacy-format `images_best.pt` (PyTorch < 1.6) beside honest labels, with `kw` passed to
  `torchfiles.write_legacy` to damage it."""
  images, raw = tf.tensor("0", honest_images().transpose(0, 3, 1, 2))
  labels, labels_raw = tf.tensor("0", np.arange(10, dtype=np.int64))
  tf.write_zip(tmp_path / "labels_best.pt", labels, {"0": labels_raw})
  path = tmp_path / "images_best.pt"
  tf.write_legacy(path, kw.pop("obj", images), {"0": raw}, **kw)
  return path


def zip_images(tmp_path, obj, storages=None):
  labels, labels_raw = tf.tensor("0", np.arange(10, dtype=np.int64))
  tf.write_zip(tmp_path / "labels_best.pt", labels, {"0": labels_raw})
  path = tmp_path / "images_best.pt"
  tf.write_zip(path, obj, storages if storages is not None else {})
  return path


def self_containing(kind):
  value = [] if kind == "list" else {}
  if kind == "list":
    value.append(value)
  else:
    value["me"] = value
  return value


ONE_LINE = {
    # legacy torch.save files
    "legacy_cut_in_storage_header": (
        lambda p: legacy_images(p, tail=b"\x10\x1f\x00"), r"cut short in the header of storage 0"),
    "legacy_negative_count": (
        lambda p: legacy_images(p, counts={"0": -5}), r"storage 0 declares -5 elements"),
    "legacy_count_2_60": (
        lambda p: legacy_images(p, counts={"0": 2**60}),
        r"storage 0 declares 1,152,921,504,606,846,976 elements of float32; the file has "
        r"31,360 bytes left \(cut short or damaged\)"),
    "legacy_keys_not_a_list": (
        lambda p: legacy_images(p, keys={"0": 1}), r"the list of storage keys is a dict"),
    "legacy_storage_cut_short": (
        lambda p: legacy_images(p, tail=b"\x10\x1f\x00\x00\x00\x00\x00\x00" + bytes(100)),
        r"storage 0 declares 7,952 elements"),
    "zero_d_tensor_offset_1e9": (
        lambda p: zip_images(p, tf.Tensor(tf.Storage("0", np.float32, 4), 10**9, (), ()),
                             {"0": bytes(16)}),
        r"a tensor of shape \(\) \(1 elements\) over 0 elements of its storage"),
    "legacy_zero_d_tensor_offset_1e9": (
        lambda p: legacy_images(p, obj=tf.Tensor(tf.Storage("0", np.float32, 7840), 10**9, (),
                                                 ())),
        r"a tensor of shape \(\) \(1 elements\) over 0 elements of its storage"),
    "negative_shape": (
        lambda p: zip_images(p, tf.Tensor(tf.Storage("0", np.float32, 4), 0, (-2, 2), (2, 1)),
                             {"0": bytes(16)}),
        r"a tensor with shape \(-2, 2\), strides \(2, 1\) and offset 0 does not describe"),
    "list_containing_itself": (
        lambda p: zip_images(p, self_containing("list")), r"a list that contains itself"),
    "dict_containing_itself": (
        lambda p: zip_images(p, {"data": self_containing("dict")}),
        r"a dict that contains itself"),
    "nested_200000_deep": (
        lambda p: zip_images(p, tf.Raw(b"]" * 200_000 + b"a" * 199_999)),
        r"containers nested more than 100 deep"),
    "build_on_an_allowed_global": (
        lambda p: zip_images(p, [tf.Build(tf.Global("torch", "FloatStorage"),
                                          {"dtype": "float64"})]),
        r"refused: the pickle tries to change torch.FloatStorage"),
    # our .npz
    "config_not_json": (lambda p: ours(p, config=np.asarray("{ipc: 1")),
                        r"'config' is not readable JSON"),
    "config_nested_100000_deep": (
        lambda p: ours(p, config=np.asarray("[" * 100_000 + "]" * 100_000)),
        r"'config' is not readable JSON \(nested too deep\)"),
    "config_not_an_object": (lambda p: ours(p, config=np.asarray("[1, 2]")),
                             r"'config' must be a JSON object, found list"),
    "dataset_as_array": (lambda p: ours(p, dataset=np.asarray(["mnist", "mnist"])),
                         r"'dataset' must hold one str, found <U5 of shape \(2,\)"),
    "step_as_array": (lambda p: ours(p, step=np.arange(3)), r"'step' must hold one int"),
    "step_as_text": (lambda p: ours(p, step=np.asarray("5")), r"'step' must hold one int"),
    "images_as_strings": (lambda p: ours(p, images=np.full((10, 28, 28, 1), "x")),
                          r"images must hold numbers, found <U1 values"),
    "seven_channel_statistics": (lambda p: ours(p, pre_mean=np.zeros(7), pre_std=np.ones(7)),
                                 r"pre_mean has shape \(7,\); for images \(28, 28, 1\) it must "
                                 r"be \(1,\)"),
    "no_images": (lambda p: ours(p, images=np.zeros((0, 28, 28, 1), np.float32),
                                 labels=np.zeros((0, 10), np.float32)), r"holds no images"),
    "mean_is_nan": (lambda p: ours(p, pre_mean=np.asarray([np.nan])),
                    r"pre_mean holds NaN or infinite values"),
    "std_is_zero": (lambda p: ours(p, pre_std=np.asarray([0.0])),
                    r"pre_std must be above zero, got \[0.0\]"),
    "extra_is_nan": (lambda p: ours(p, extra_lr=np.asarray(np.nan)),
                     r"lr contain NaN or infinite values"),
    "not_a_zip": (lambda p: _write_bytes(p / "distilled.npz", b"PK\x03\x04 broken"),
                  r"not a readable .npz file"),
    # other projects' .npz
    "rfad_k_as_string": (
        lambda p: _write_npz(p / "best.npz", images=honest_images().transpose(0, 3, 1, 2),
                             labels=MNIST_LABELS, k=np.asarray("1.0"), jit=np.asarray(0.005)),
        r"k must hold numbers, found <U3 values"),
}


def _write_bytes(path, data):
  path.write_bytes(data)
  return path


def _write_npz(path, **arrays):
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize("case", sorted(ONE_LINE))
def test_a_bad_file_is_one_line(case, tmp_path, run_in_process):
  make, message = ONE_LINE[case]
  path = make(tmp_path)
  out = run_in_process("experiments.evaluate", "--support", str(path), "--dataset", "mnist")
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2, out.stderr
  assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), out.stderr
  assert "Traceback" not in out.stderr
  import re

  assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("command", ["experiments.show", "experiments.transfer"])
def test_an_empty_set_is_refused_by_every_reader(command, tmp_path, run_in_process):
  path = ours(tmp_path, images=np.zeros((0, 28, 28, 1), np.float32),
              labels=np.zeros((0, 10), np.float32))
  args = ([str(path)] if command == "experiments.show" else
          ["--support", str(path), "--workdir", str(tmp_path / "run")])
  out = run_in_process(command, *args, "--dataset", "mnist")
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip() == f"error: {path}: holds no images"
  assert not (tmp_path / "run").exists()


def test_a_hostile_file_does_not_change_how_the_next_is_read(tmp_path):
  """A pickle that BUILDs on the allow-listed storage type is refused, and the files read after
  it in the same process read as before (the reader hands out nothing a pickle can change)."""
  images, raw = tf.tensor("0", np.arange(6, dtype=np.float32).reshape(2, 3))
  honest = tmp_path / "honest.pt"
  tf.write_zip(honest, images, {"0": raw})
  for i, state in enumerate(({"dtype": np.float64}, (None, {"dtype": "float64"}),
                             {"__class__": "x"})):
    hostile = tmp_path / f"hostile{i}.pt"
    tf.write_zip(hostile, [tf.Build(tf.Global("torch", "FloatStorage"), {"dtype": 1}
                                    if not isinstance(state, tuple) else state), images],
                 {"0": raw})
    with pytest.raises(UnsafeFileError, match="tries to change torch.FloatStorage"):
      read_torch(str(hostile))
    np.testing.assert_array_equal(read_torch(str(honest)), [[0, 1, 2], [3, 4, 5]])
  for module, name in (("torch._utils", "_rebuild_tensor_v2"), ("numpy", "dtype")):
    hostile = tmp_path / "function.pt"
    tf.write_zip(hostile, [tf.Build(tf.Global(module, name), {"__call__": 1}), images],
                 {"0": raw})
    with pytest.raises(UnsafeFileError, match=f"tries to change {module}.{name}"):
      read_torch(str(hostile))
    np.testing.assert_array_equal(read_torch(str(honest)), [[0, 1, 2], [3, 4, 5]])


def test_the_honest_writer_reads_back(tmp_path):
  """The tests' torch.save writer against the reader: both formats, a view at an offset."""
  data = np.arange(24, dtype=np.float32)
  view = tf.Tensor(tf.Storage("0", np.float32, 24), 2, (2, 3), (6, 2))
  expected = data[2:].reshape(-1)[: 12].reshape(2, 6)[:, ::2]
  tf.write_zip(tmp_path / "z.pt", {"data": [view]}, {"0": data.tobytes()})
  tf.write_legacy(tmp_path / "l.pt", {"data": [view]}, {"0": data.tobytes()})
  for name in ("z.pt", "l.pt"):
    np.testing.assert_array_equal(read_torch(str(tmp_path / name))["data"][0], expected)


def test_npz_keys_nobody_reads_are_never_inflated(tmp_path):
  path = ours(tmp_path)
  add_bomb(path, size=64 * 2**20)
  loaded = load_distilled(str(path), "mnist")
  np.testing.assert_array_equal(loaded.images, honest_images())
  bomb = ours(tmp_path, "b.npz")
  add_bomb(bomb, key="extra_big", size=GIB)
  with pytest.raises(FileFormatError, match="refused: entry extra_big.npy inflates to"):
    load_distilled(str(bomb), "mnist")
  # A run's record of its input digests such a file by its bytes, never inflating the bomb.
  assert ":" not in file_digest(str(bomb))
  assert file_digest(str(path)).startswith("npz:")


# ------------------------------------------------------------------------------------------------
# Disk full, read-only folders

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_write_names_the_file_and_leaves_nothing(code, tmp_path, monkeypatch):
  """atomic_write (checkpoints, distilled.npz, config.json) raises OSError naming the file it
  meant, whatever call failed, and leaves no temporary behind."""
  import kip.files

  target = tmp_path / "checkpoints" / "ckpt_00000100.npz"
  real = os.fdopen

  def failing(fd, *args, **kwargs):
    handle = real(fd, *args, **kwargs)

    class Failing:
      def __enter__(self):
        return self

      def __exit__(self, *exc):
        handle.close()

      def write(self, _):
        raise OSError(code, os.strerror(code))

    return Failing()

  monkeypatch.setattr(kip.files.os, "fdopen", failing)
  with pytest.raises(OSError) as error:
    atomic_write(str(target), {"x": np.zeros(3)})
  assert error.value.errno == code and error.value.filename == str(target)
  assert os.listdir(target.parent) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_command_that_cannot_write_says_so_in_one_line(code, tmp_path, monkeypatch,
                                                         run_in_process):
  """`show` writing its figure onto a full disk or a read-only folder: exit 2, one line naming
  the file and the cause."""
  import kip.files

  path = ours(tmp_path)
  out_png = tmp_path / "figures" / "set.png"

  def failing(fd, *args, **kwargs):
    os.close(fd)
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(kip.files.os, "fdopen", failing)
  out = run_in_process("experiments.show", str(path), "--dataset", "mnist", "--out",
                       str(out_png))
  assert out.returncode == 2, out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last == f"error: cannot write {out_png}: {os.strerror(code)}"
  assert "Traceback" not in out.stderr
  assert not any(name.endswith(".tmp") for name in os.listdir(out_png.parent))


def _damage(data: bytes, rng) -> bytes:
  """`data` with a few bytes changed, cut short, or a run of 8 bytes replaced."""
  b = bytearray(data)
  kind = rng.integers(3)
  if kind == 0:
    for _ in range(rng.integers(1, 8)):
      b[rng.integers(len(b))] = rng.integers(256)
  elif kind == 1:
    b = b[: rng.integers(len(b))]
  else:
    at = rng.integers(len(b))
    b[at:at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
  return bytes(b)


@pytest.mark.parametrize("kind", ["pt_zip", "pt_legacy", "ours_npz", "rfad_npz", "npy_pair"])
def test_damaged_files_are_refused_in_one_line_never_a_traceback(kind, tmp_path):
  """400 random damages of each format (bytes changed, the file cut short): each reads, or is
  refused with FileFormatError; no other exception escapes (zipfile alone raises a dozen)."""
  images = honest_images().transpose(0, 3, 1, 2)
  if kind in ("pt_zip", "pt_legacy"):
    tensor, raw = tf.tensor("0", images)
    path = (zip_images(tmp_path, tensor, {"0": raw}) if kind == "pt_zip"
            else legacy_images(tmp_path))
  elif kind == "ours_npz":
    path = ours(tmp_path, extra_lr=np.asarray(0.01, np.float32))
  elif kind == "rfad_npz":
    path = tmp_path / "best_mnist.npz"
    np.savez_compressed(path, images=images, labels=MNIST_LABELS, k=np.asarray(1.0),
                        jit=np.asarray(0.005))
  else:
    path = tmp_path / "images_mnist.npy"
    np.save(path, images)
    np.save(tmp_path / "labels_mnist.npy", np.arange(10))
  data, rng = path.read_bytes(), np.random.default_rng(0)
  outcomes = {"read": 0, "refused": 0}
  for _ in range(400):
    path.write_bytes(_damage(data, rng))
    try:
      load_distilled(str(path), "mnist")
      outcomes["read"] += 1
    except FileFormatError as e:
      assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
      outcomes["refused"] += 1
  assert outcomes["refused"] > 100, outcomes
