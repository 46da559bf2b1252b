"""The trajectory-matching commands end to end on real MNIST at a tiny size: buffers (plain and
PAD's curriculum), MTT and PAD (DATM plus a mask: its initial images and soft labels), the sets'
learned learning rate and soft labels used by `experiments.transfer`, one-line refusals."""

import json

import numpy as np
import pytest

from kip.io import load_distilled
from kip.loop import read_metrics

pytestmark = pytest.mark.slow


def _buffer_args(folder, manual_dir, data_dir, *extra):
  return ["--dataset", "mnist", "--experts", "1", "--epochs", "3", "--width", "4", "--batch",
          "64", "--train-size", "300", "--buffer", str(folder), "--manual-dir", manual_dir,
          "--data-dir", data_dir, "--no-progress", *extra]


def _distil_args(workdir, buffer, manual_dir, data_dir, *extra):
  return ["--dataset", "mnist", "--ipc", "2", "--buffer", str(buffer), "--steps", "2",
          "--syn-steps", "2", "--expert-epochs", "2", "--eval-every", "2", "--eval-steps", "5",
          "--workdir", str(workdir), "--manual-dir", manual_dir, "--data-dir", data_dir,
          "--no-progress", *extra]


def test_a_buffer_then_mtt(tmp_path, manual_dir, data_dir, run_in_process):
  plain = tmp_path / "plain"
  made = run_in_process("experiments.buffer", *_buffer_args(plain, manual_dir, data_dir))
  assert made.returncode == 0, made.stderr
  store = json.loads((plain / "store.json").read_text())
  assert store["epochs"] == 3 and store["settings"]["train_size"] == 300
  assert np.load(plain / "expert_000" / "trajectory.npy").shape == (4, store["num_params"])
  assert not (plain / "work" / "expert_000").exists()
  # Another setting in the same store is refused, in one line; nothing is trained.
  clash = run_in_process("experiments.buffer",
                         *_buffer_args(plain, manual_dir, data_dir, "--lr", "0.02"))
  assert clash.returncode == 2 and "lr: store 0.01, asked 0.02" in clash.stderr

  mtt = run_in_process("experiments.mtt", *_distil_args(tmp_path / "mtt", plain, manual_dir,
                                                        data_dir, "--max-start-epoch", "1"))
  assert mtt.returncode == 0, mtt.stderr
  records = read_metrics(tmp_path / "mtt" / "metrics.jsonl")
  assert [r["step"] for r in records if "finite_test_acc" in r] == [2]
  assert all(r["start_epoch"] == 0 for r in records if "start_epoch" in r)
  mtt_set = load_distilled(str(tmp_path / "mtt" / "distilled.npz"))
  assert mtt_set.images.shape == (20, 28, 28, 1) and float(mtt_set.extras["lr"]) != 0.01
  missing = run_in_process("experiments.mtt", *_distil_args(tmp_path / "none", tmp_path / "no",
                                                            manual_dir, data_dir))
  assert missing.returncode == 2 and "experiments.buffer" in missing.stderr


def test_a_curriculum_buffer_then_pad_then_transfer(tmp_path, manual_dir, data_dir,
                                                    run_in_process):
  pad_buffer = tmp_path / "pad_buffer"
  curriculum = ("--curriculum", "pad", "--score-nets", "1", "--score-steps", "3", "--init-ratio",
                "0.5", "--add-end-epoch", "2", "--drops", "2:0.2")
  made = run_in_process("experiments.buffer",
                        *_buffer_args(pad_buffer, manual_dir, data_dir, *curriculum))
  assert made.returncode == 0, made.stderr
  assert np.load(pad_buffer / "difficulty.npy").shape == (300,)
  # A finished store is not scored again (as when restored without its scores): the scores
  # order only an expert still to train.
  (pad_buffer / "difficulty.npy").unlink()
  again = run_in_process("experiments.buffer",
                         *_buffer_args(pad_buffer, manual_dir, data_dir, *curriculum))
  assert again.returncode == 0, again.stderr
  assert "EL2N" not in again.stderr and not (pad_buffer / "difficulty.npy").exists()
  pad = run_in_process("experiments.pad", *_distil_args(
      tmp_path / "pad", pad_buffer, manual_dir, data_dir, "--max-start-epoch", "1",
      "--max-start-epoch-final", "2"))
  assert pad.returncode == 0, pad.stderr
  assert "shallow mask, ratio 0.0" in pad.stderr  # 2 images per class: the ipc-1 setting
  assert "the expert classifies correctly" in pad.stderr  # DATM's initial images
  pad_set = load_distilled(str(tmp_path / "pad" / "distilled.npz"))
  np.testing.assert_allclose(pad_set.labels.sum(-1), 1.0, rtol=1e-5)  # DATM's soft labels
  assert pad_set.labels.max() < 1.0 and "label_logits" in pad_set.extras

  # transfer trains the set at its learned rate, on its soft labels.
  out = run_in_process("experiments.transfer", "--support", str(tmp_path / "pad" / "distilled.npz"),
                       "--dataset", "mnist", "--protocol", "dc", "--steps", "3", "--seeds", "1",
                       "--width", "4", "--baselines", "none", "--workdir", str(tmp_path / "t"),
                       "--manual-dir", manual_dir, "--data-dir", data_dir, "--no-progress")
  assert out.returncode == 0, out.stderr
  assert "carries a learned learning rate" in out.stderr
  row = json.loads((tmp_path / "t" / "transfer.json").read_text())["rows"][0]
  assert row["lr"] == float(pad_set.extras["lr"])
