"""`experiments.transfer`, `experiments.show` and the demo notebook, end to end on real MNIST at
a tiny size: a released-layout set and one of ours load and train, rows resume, pictures are
written, and user mistakes end in one line."""

import json
import os
import re

import matplotlib.image
import nbformat
import numpy as np
import pytest
from conftest import ROOT
from nbclient import NotebookClient

from kip.data import centered_one_hot, class_balanced_indices, fit_preprocessor
from kip.io import DistilledSet, save_distilled

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sets(mnist, tmp_path_factory):
  """Five real images per class, saved (a) in the released layout (only `images` and `labels`,
  named as the authors name theirs) and (b) as ours (with the preprocessing and metadata)."""
  folder = tmp_path_factory.mktemp("sets")
  pre = fit_preprocessor(mnist["train"].images)
  idx = class_balanced_indices(mnist["train"].labels, 5, np.random.default_rng(1), 10)
  images = pre.apply(mnist["train"].images[idx])
  labels = centered_one_hot(mnist["train"].labels[idx], 10)
  released = folder / "kip" / "mnist" / "ConvNet_ssize50_nozca_nol_noaug_ckpt0.npz"
  released.parent.mkdir(parents=True)
  np.savez(released, images=images, labels=labels)
  ours = folder / "distilled.npz"
  save_distilled(str(ours), DistilledSet(images, labels, {"dataset": "mnist", "step": 0}, pre))
  return {"released": str(released), "ours": str(ours)}


def transfer_args(support, workdir, manual_dir, data_dir, *extra):
  return ["--support", support, "--dataset", "mnist", "--net", "mlp", "--width", "256",
          "--steps", "60", "--seeds", "2", "--eval-every", "30", "--workdir", str(workdir),
          "--manual-dir", manual_dir, "--data-dir", data_dir, "--no-progress", *extra]


def test_transfer_trains_a_released_set_beside_the_random_baseline_and_resumes(
    sets, tmp_path, manual_dir, data_dir, run_in_process):
  args = transfer_args(sets["released"], tmp_path / "run", manual_dir, data_dir)
  first = run_in_process("experiments.transfer", *args, "--progress")
  assert first.returncode == 0, first.stderr
  # The whole job is announced first, and one bar counts it: its ETA is the job's.
  assert ("the job: 2 rows (distilled 60 steps, random 60 steps), 2 seeds each: 120 steps with "
          "test evaluations every 30 steps") in first.stderr
  assert {int(n) for n in re.findall(r" (\d+)/(?:120)\b", first.stderr)} >= {60, 120}
  assert not re.findall(r" \d+/60\b", first.stderr)  # no bar counts one row alone
  assert "[1/2] distilled" in first.stderr and "[2/2] random" in first.stderr
  assert "ConvNet_ssize50_nozca_nol_noaug_ckpt0.npz" in first.stdout and "random" in first.stdout
  report = json.loads((tmp_path / "run" / "transfer.json").read_text())
  rows = {r["row"]: r for r in report["rows"]}
  assert set(rows) == {"distilled", "random"} and report["test_images"] == 10000
  for row in rows.values():
    assert len(row["test_acc"]) == 2 and row["n_images"] == 50 and row["steps"] == 60
    assert row["test_acc_mean"] > 0.4  # 50 real images, 60 steps: ~0.6; chance 0.1
    assert row["test_acc_std"] == pytest.approx(np.std(row["test_acc"]))
  curve = [json.loads(line) for line in open(tmp_path / "run" / "random" / "metrics.jsonl")]
  assert [c["step"] for c in curve if "test_acc" in c] == [0, 30, 60]

  # Re-run with the baseline alone: read back, not trained again, the same numbers.
  baseline_only = run_in_process("experiments.transfer", *args, "--no-distilled")
  assert baseline_only.returncode == 0, baseline_only.stderr
  assert baseline_only.stderr.count("resuming from step 60") == 1
  (only,) = json.loads((tmp_path / "run" / "transfer.json").read_text())["rows"]
  assert only == rows["random"]
  nothing = run_in_process("experiments.transfer", *args, "--no-distilled", "--baselines", "none")
  assert nothing.returncode == 2 and "nothing to train" in nothing.stderr

  changed = run_in_process("experiments.transfer", *transfer_args(
      sets["released"], tmp_path / "run", manual_dir, data_dir, "--protocol", "dc"))
  assert changed.returncode == 2
  assert changed.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "protocol: 'kip' -> 'dc'" in changed.stderr


def test_transfer_of_our_set_under_the_dc_protocol(sets, tmp_path, manual_dir, data_dir,
                                                   run_in_process):
  result = run_in_process("experiments.transfer", "--support", sets["ours"], "--dataset", "mnist",
                          "--net", "convnet3", "--width", "16", "--protocol", "dc", "--steps",
                          "40", "--seeds", "2", "--baselines", "none", "--eval-every", "40",
                          "--workdir", str(tmp_path / "dc"), "--manual-dir", manual_dir,
                          "--data-dir", data_dir, "--no-progress")
  assert result.returncode == 0, result.stderr
  (row,) = json.loads((tmp_path / "dc" / "transfer.json").read_text())["rows"]
  assert row["protocol"] == "dc" and row["norm"] == "instance" and row["lr"] == 0.01
  assert row["test_acc_mean"] > 0.2


@pytest.mark.parametrize("flags,message", [
    (["--baselines", "bogus"], "unknown baseline bogus"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--net", "vgg"], "invalid choice: 'vgg'"),
    (["--lr", "0.1", "--lr-grid", "0.1,1"], "--lr and --lr-grid exclude each other"),
    (["--lr-grid", "0.1,fast"], "--lr-grid: 'fast' is not a positive learning rate"),
    (["--lr-grid", "0.1,-1"], "--lr-grid: '-1' is not a positive learning rate"),
    (["--lr-grid", "x0,1"], "--lr-grid: 'x0' is not a positive learning rate (or xM"),
])
def test_transfer_user_errors_are_one_line(sets, tmp_path, manual_dir, data_dir, flags, message,
                                           run_in_process):
  result = run_in_process("experiments.transfer", *transfer_args(sets["ours"], tmp_path / "x",
                                                                 manual_dir, data_dir), *flags)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: ")
  assert message in result.stderr
  assert "Traceback" not in result.stderr


def test_show_draws_the_grid_and_the_curves(sets, tmp_path, manual_dir, data_dir, run_in_process):
  grid = run_in_process("experiments.show", sets["ours"], "--out", str(tmp_path / "grid.png"))
  assert grid.returncode == 0, grid.stderr
  image = matplotlib.image.imread(tmp_path / "grid.png")
  assert image.shape[0] > image.shape[1]  # ten class rows of five images
  # A released set: its preprocessing is refitted on the real training split.
  released = run_in_process("experiments.show", sets["released"], "--out", str(tmp_path / "r.png"),
                            "--manual-dir", manual_dir, "--data-dir", data_dir)
  assert released.returncode == 0, released.stderr
  assert os.path.getsize(tmp_path / "r.png") > 10_000

  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text("".join(json.dumps({"step": s, "test_acc": [a, a + 0.02]}) + "\n"
                             for s, a in ((0, 0.1), (10, 0.5), (20, 0.7))))
  curve = run_in_process("experiments.show", "--metrics", str(metrics), "--out",
                         str(tmp_path / "curve.png"))
  assert curve.returncode == 0, curve.stderr
  assert matplotlib.image.imread(tmp_path / "curve.png").ndim == 3

  neither = run_in_process("experiments.show")
  assert neither.returncode == 2 and "give either a distilled set" in neither.stderr
  empty = tmp_path / "empty.jsonl"
  empty.write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
  bad = run_in_process("experiments.show", "--metrics", str(empty))
  assert bad.returncode == 2 and "no test_acc records" in bad.stderr


def test_demo_notebook_runs_headless(sets, tmp_path, manual_dir, data_dir, monkeypatch):
  notebook = nbformat.read(ROOT / "notebooks" / "transfer_demo.ipynb", as_version=4)
  parameters = notebook.cells[1]
  assert parameters.source.startswith("# Parameters")
  parameters.source += "\n".join([
      "", f"SUPPORT = {sets['ours']!r}", "NET = 'mlp'", "WIDTH = 4", "STEPS = 10", "SEEDS = 2",
      "EVAL_EVERY = 5", "TEST_IMAGES = 200", f"OUT_DIR = {str(tmp_path)!r}",
      f"MANUAL_DIR = {manual_dir!r}"])
  monkeypatch.setenv("KIP_DATA_DIR", data_dir)
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
  client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT)}})
  client.execute()
  printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                    for o in c.outputs)
  assert "distilled:" in printed and "random subset:" in printed
  assert (tmp_path / "grid.png").exists() and (tmp_path / "curve.png").exists()


def test_hard_labels_are_each_images_largest_label():
  """`--labels hard`: the set's learned labels replaced by the centred one-hot of their argmax
  (what DD-Ranking's label-robust score trains on); `set` keeps them as stored."""
  import dataclasses

  from evaluation.transfer import Config, _row_data

  rng = np.random.default_rng(0)
  learned = rng.normal(size=(6, 3)).astype(np.float32)
  distilled = DistilledSet(rng.normal(size=(6, 4, 4, 1)).astype(np.float32), learned)
  config = Config(support="s.npz", steps=7)
  _, kept, _ = _row_data("distilled", config, distilled, None, [0])
  np.testing.assert_array_equal(kept, learned)
  _, hard, steps = _row_data("distilled", dataclasses.replace(config, labels="hard"), distilled,
                             None, [0])
  expected = np.full((6, 3), -1 / 3, np.float32)
  expected[np.arange(6), learned.argmax(1)] += 1
  np.testing.assert_allclose(hard, expected)
  assert steps == 7


def test_the_kip_protocol_trains_the_architecture_of_the_sets_kernel():
  """`--net auto` under `kip`: the finite net of the kernel the set was distilled with (fc ->
  mlp, conv -> conv, each with the kernel's depth; a release named ConvNet3 -> convnet3), else
  the protocol's convnet; other protocols keep their own net; `--net` and `--depth` win."""
  import dataclasses

  from evaluation.transfer import Config, _net_settings, _protocol
  from kip.io import parse_release_name

  def ours(kernel, depth):
    return DistilledSet(np.zeros((1, 28, 28, 1), np.float32), np.zeros((1, 10), np.float32),
                        {"config": {"kernel": kernel, "depth": depth}})

  kip = Config(support="s.npz")
  assert _net_settings(kip, ours("conv", 2))[:4] == ("conv", 64, "none", 2)
  assert _net_settings(kip, ours("fc", 3))[:4] == ("mlp", 64, "none", 3)
  assert _net_settings(kip, ours("convnet", 1))[:4] == ("convnet", 64, "none", 0)
  assert "the set's kernel" in _net_settings(kip, ours("conv", 1))[4]
  assert _net_settings(kip, ours("nfk-convnet", 1))[0] == "convnet"  # a finite kernel: as before
  assert _net_settings(kip, DistilledSet(np.zeros((1, 28, 28, 1)), None))[0] == "convnet"
  release = DistilledSet(np.zeros((1, 28, 28, 1)), None,
                         release=parse_release_name("kip/mnist/ConvNet3_ssize10_nozca_l.npz"))
  assert _net_settings(kip, release)[0] == "convnet3"
  assert _net_settings(dataclasses.replace(kip, depth=4), ours("conv", 2))[3] == 4
  assert _net_settings(dataclasses.replace(kip, net="convnet"), ours("conv", 2))[0] == "convnet"
  dc = dataclasses.replace(kip, protocol="dc")
  assert _net_settings(dc, ours("conv", 2))[:3] == ("convnet3", 128, "instance")
  # --center: auto keeps each protocol's own (rfad centres), on / off override it.
  assert not _protocol(kip).center_output
  centred = _protocol(dataclasses.replace(kip, center="on"))
  assert centred.center_output and centred.decay_to_init  # the penalty pulls toward the init
  assert _protocol(dataclasses.replace(kip, protocol="rfad")).center_output
  off = _protocol(dataclasses.replace(kip, protocol="rfad", center="off"))
  assert not off.center_output and not off.decay_to_init


def test_lr_grid_chooses_each_rows_rate_on_a_validation_split(sets, tmp_path, manual_dir,
                                                              data_dir, run_in_process):
  """A rate too small to move the weights (1e-5 times the row's own rate), the row's own, a
  working one (0.1) and one whose networks diverge (1e6): each row keeps the one whose networks
  score higher on 1,000 validation images held out of the training split (the diverging one is
  recorded as such and does not stop the job), and is then trained again at it and tested on the
  test split."""
  args = transfer_args(sets["ours"], tmp_path / "grid", manual_dir, data_dir)
  result = run_in_process("experiments.transfer", *args, "--lr-grid", "0.1,x1e-5,x1,1e6",
                          "--val-size", "1000")
  assert result.returncode == 0, result.stderr
  assert "chosen on the validation split" in result.stderr + result.stdout
  rows = json.loads((tmp_path / "grid" / "transfer.json").read_text())["rows"]
  for row in rows:
    search = {r["grid"]: r for r in row["lr_search"]}
    assert set(search) == {"x1e-05", "x1", "0.1", "1e+06"} and row["val_size"] == 1000
    assert search.pop("1e+06")["diverged"].startswith("a non-finite value")
    # xM: M times the rate the row trains at without a grid (the kip protocol's NTK estimate)
    assert search["x1e-05"]["lr"] == pytest.approx(1e-5 * search["x1"]["lr"])
    assert search["0.1"]["lr"] == 0.1
    assert search["0.1"]["val_acc_mean"] > search["x1e-05"]["val_acc_mean"] + 0.2
    best = max(search.values(), key=lambda r: r["val_acc_mean"])
    assert row["lr"] == best["lr"] and best["grid"] != "x1e-05"
    assert row["test_acc_mean"] > 0.4
    # The validation networks were evaluated on the held-out images, not on the test split.
    curve = [json.loads(line) for line in open(tmp_path / "grid" / row["row"] / "lr0.1" /
                                               "metrics.jsonl")]
    assert curve[-1]["test_acc"] == pytest.approx(search["0.1"]["val_acc"])


def test_a_set_with_a_learned_rate_below_zero_trains_at_the_protocols_and_says_so(
    mnist, tmp_path, manual_dir, data_dir, run_in_process):
  """An MTT-style set whose learned learning rate went negative: its row trains at the dc
  protocol's 0.01, and the log says why (it used to announce the negative rate)."""
  pre = fit_preprocessor(mnist["train"].images)
  idx = class_balanced_indices(mnist["train"].labels, 1, np.random.default_rng(2), 10)
  path = tmp_path / "negative_lr.npz"
  save_distilled(str(path), DistilledSet(
      pre.apply(mnist["train"].images[idx]), centered_one_hot(mnist["train"].labels[idx], 10),
      {"dataset": "mnist", "step": 0}, pre, extras={"lr": np.float32(-0.02)}))
  result = run_in_process("experiments.transfer", "--support", str(path), "--dataset", "mnist",
                          "--net", "mlp", "--width", "16", "--protocol", "dc", "--steps", "5",
                          "--seeds", "1", "--baselines", "none", "--workdir", str(tmp_path / "t"),
                          "--manual-dir", manual_dir, "--data-dir", data_dir, "--no-progress")
  assert result.returncode == 0, result.stderr
  assert "learned learning rate -0.02 is not positive" in result.stderr + result.stdout
  (row,) = json.loads((tmp_path / "t" / "transfer.json").read_text())["rows"]
  assert row["lr"] == 0.01
