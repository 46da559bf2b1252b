"""`experiments.fetch`: a released KIP set by its published name, into a cache (from a local
mirror of the bucket here: file://), checked before it takes its name; offline and bad names are
one line."""

import os
import time

import numpy as np
import pytest

from evaluation.fetch import STALE_S, fetch, release_url, sweep_stale
from kip import cli
from kip.io import load_distilled

NAME = "kip/mnist/ConvNet_ssize20_nozca_l_noaug_ckpt0.npz"


@pytest.fixture
def mirror(tmp_path, monkeypatch):
  bucket = tmp_path / "bucket"
  (bucket / "kip" / "mnist").mkdir(parents=True)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(20, 28, 28, 1)).astype(np.float32)
  labels = (np.eye(10)[np.arange(20) % 10] - 0.1).astype(np.float32)
  np.savez(bucket / NAME, images=images, labels=labels)
  monkeypatch.setenv("KIP_RELEASES_URL", bucket.as_uri())
  return bucket, images, labels


def test_a_released_set_is_fetched_once_into_the_cache(tmp_path, mirror):
  bucket, images, labels = mirror
  assert release_url(NAME) == f"{bucket.as_uri()}/{NAME}"
  path = fetch(NAME, str(tmp_path / "cache"))
  assert path == str(tmp_path / "cache" / "releases" / "kip" / "mnist" /
                     "ConvNet_ssize20_nozca_l_noaug_ckpt0.npz")
  loaded = load_distilled(path, "mnist")
  np.testing.assert_array_equal(loaded.images, images)
  assert loaded.release.ssize == 20 and loaded.release.learned_labels
  os.unlink(bucket / NAME)  # the second time it is read from the cache, not the bucket
  assert fetch(NAME, str(tmp_path / "cache")) == path
  assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # nothing left over


def test_a_broken_download_never_takes_the_name(tmp_path, mirror):
  bucket, _, _ = mirror
  (bucket / NAME).write_bytes(b"<html>not found</html>")
  with pytest.raises(cli.UserError, match=r"could not fetch .*ConvNet_ssize20"):
    fetch(NAME, str(tmp_path / "cache"))
  folder = tmp_path / "cache" / "releases" / "kip" / "mnist"
  assert os.listdir(folder) == []  # no half file, no temporary folder


def test_offline_and_bad_names_are_one_line(tmp_path, monkeypatch, run_in_process):
  monkeypatch.setenv("KIP_RELEASES_URL", "https://kip-datasets.invalid")
  out = run_in_process("experiments.fetch", NAME, "--cache", str(tmp_path))
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert "cannot reach kip-datasets.invalid:443" in out.stderr
  assert f"put it at {tmp_path}/releases/{NAME}" in out.stderr
  for bad in ("mnist/ConvNet_ssize20_nozca_l_noaug_ckpt0.npz", "kip/mnist/grid.npz",
              "kip/mnist_x/ConvNet_ssize20_nozca_l_noaug_ckpt0.npz"):
    out = run_in_process("experiments.fetch", bad, "--cache", str(tmp_path))
    assert out.returncode == 2 and "is not a released set's name" in out.stderr, out.stderr


def test_a_killed_downloads_folder_is_swept_but_not_a_running_one(tmp_path):
  old, new = tmp_path / ".fetch-old", tmp_path / ".fetch-new"
  for folder in (old, new):
    folder.mkdir()
    (folder / "part.npz").write_bytes(b"x")
  (tmp_path / "kept.npz").write_bytes(b"x")
  hours_ago = time.time() - 2 * STALE_S
  os.utime(old, (hours_ago, hours_ago))
  sweep_stale(str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == [".fetch-new", "kept.npz"]
