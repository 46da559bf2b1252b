"""KRR-ST's three commands end to end on real MNIST at a tiny size (teacher -> distillation ->
pre-train/fine-tune evaluation), the teacher's reuse keyed on its full config, and their one-line
errors."""

import dataclasses
import json

import numpy as np
import pytest

from kip.io import load_distilled
from kip.loop import read_metrics
from methods.barlow import Config as TeacherConfig
from methods.barlow import default_teacher

pytestmark = pytest.mark.slow


def test_a_teacher_is_found_by_its_full_config_and_never_reused_for_another():
  base = TeacherConfig(dataset="mnist")
  assert base.default_workdir() == TeacherConfig(dataset="mnist").default_workdir()
  # Paths, display and checkpoint cadence do not make another teacher...
  for same in ({"progress": False}, {"checkpoint_every": 7}, {"manual_dir": "/x"}):
    assert dataclasses.replace(base, **same).default_workdir() == base.default_workdir()
  # ...every training setting does.
  others = [{"epochs": 4.0}, {"width": 8}, {"lambd": 0.01}, {"views": "crop"}, {"seed": 1},
            {"dataset": "fashion_mnist"}, {"projector": "64-64"}, {"min_scale": 0.5}]
  folders = {dataclasses.replace(base, **o).default_workdir() for o in others}
  assert base.default_workdir() not in folders and len(folders) == len(others)
  assert default_teacher("mnist") == f"{base.default_workdir()}/teacher.msgpack"


def _teacher_args(workdir, manual_dir, data_dir, epochs="0.01"):
  # A ConvNet backbone: ResNet-18's (the default) Barlow Twins step takes 17 s to compile.
  return ["--dataset", "mnist", "--epochs", epochs, "--backbone", "convnet", "--width", "4",
          "--projector", "16-16", "--batch", "64", "--probe-steps", "50", "--checkpoint-every",
          "5", "--workdir", str(workdir), "--manual-dir", manual_dir, "--data-dir", data_dir,
          "--no-progress"]


def test_teacher_then_krr_st_then_pretraining_on_real_mnist(tmp_path, manual_dir, data_dir,
                                                            run_in_process):
  teacher_dir = tmp_path / "teacher"
  first = run_in_process("experiments.teacher", *_teacher_args(teacher_dir, manual_dir, data_dir))
  assert first.returncode == 0, first.stderr
  assert "linear-probe test accuracy" in first.stdout
  teacher = teacher_dir / "teacher.msgpack"
  steps = [r["step"] for r in read_metrics(teacher_dir / "metrics.jsonl")]
  assert steps[-1] == 10  # ceil(0.01 * 60000 / 64)
  # Another setting in the same folder is refused (the default folder is keyed on the config,
  # above; the loop's resume of a finished run is tested in test_barlow.py).
  clash = run_in_process("experiments.teacher",
                         *_teacher_args(teacher_dir, manual_dir, data_dir, "0.02"))
  assert clash.returncode == 2 and "other settings (epochs" in clash.stderr
  # Resuming the finished teacher with other paths and display flags leaves its file's bytes (the
  # digest later runs recorded it by) as they were.
  before = teacher.read_bytes()
  again = run_in_process("experiments.teacher", *_teacher_args(teacher_dir, manual_dir, data_dir),
                         "--progress", "--checkpoint-every", "7")
  assert again.returncode == 0 and teacher.read_bytes() == before

  krr_dir = tmp_path / "krr_st"
  krr_args = ["--dataset", "mnist", "--size", "20", "--teacher", str(teacher), "--steps", "8",
              "--width", "4", "--target-batch", "64", "--val-size", "300", "--eval-every", "4",
              "--checkpoint-every", "4", "--max-online-updates", "3", "--workdir", str(krr_dir),
              "--manual-dir", manual_dir, "--data-dir", data_dir, "--no-progress"]
  distil = run_in_process("experiments.krr_st", *krr_args)
  assert distil.returncode == 0, distil.stderr
  records = read_metrics(krr_dir / "metrics.jsonl")
  evals = [(r["step"], r["krr_validation_mse"]) for r in records if "krr_validation_mse" in r]
  assert [step for step, _ in evals] == [0, 4, 8] and all(np.isfinite([v for _, v in evals]))
  distilled = load_distilled(str(krr_dir / "distilled.npz"))
  # The teacher's features: ConvNet-3 at width 4 on 28x28 ends at 3 x 3 x 4.
  assert distilled.labels is None and distilled.targets.shape == (20, 36)
  assert distilled.meta["teacher"] == str(teacher) and distilled.meta["step"] == 8

  # A teacher trained on another dataset is refused in one line.
  wrong = run_in_process("experiments.krr_st", "--dataset", "fashion_mnist", "--teacher",
                         str(teacher), "--workdir", str(tmp_path / "wrong"), "--data-dir",
                         data_dir)
  assert wrong.returncode == 2 and "was trained on mnist, not fashion_mnist" in wrong.stderr
  assert not (tmp_path / "wrong").exists()

  eval_args = ["--support", str(krr_dir / "distilled.npz"), "--dataset", "mnist", "--rows",
               "none,distilled", "--seeds", "1", "--labelled", "200", "--width", "4",
               "--pretrain-epochs", "20", "--finetune-steps", "20", "--probe-steps", "100",
               "--workdir", str(tmp_path / "eval"), "--manual-dir", manual_dir, "--data-dir",
               data_dir, "--no-progress"]
  evaluation = run_in_process("experiments.pretrain", *eval_args)
  assert evaluation.returncode == 0, evaluation.stderr
  assert ("the job: 2 rows (none 0 + 20 steps, distilled 20 + 20 steps, pre-training + "
          "fine-tuning), 1 seed each: 60 steps") in evaluation.stderr  # the whole job, first
  report = json.loads((tmp_path / "eval" / "pretrain.json").read_text())
  assert [r["row"] for r in report["rows"]] == ["none", "distilled"]
  for row in report["rows"]:
    assert 0.1 < row["probe_acc_mean"] <= 1 and 0 < row["finetune_acc_mean"] <= 1
  assert report["rows"][1]["pretrain_time"] > 0
  # Re-run: every training run is read back from its workdir, not trained again: same numbers.
  again = run_in_process("experiments.pretrain", *eval_args)
  assert again.returncode == 0 and again.stderr.count("resuming from step 20") == 3
  assert again.stderr.count("linear probe read back") == 2  # not recomputed on all 70,000 images
  assert json.loads((tmp_path / "eval" / "pretrain.json").read_text())["rows"] == report["rows"]


def test_kd_announces_the_whole_job_and_one_bar_counts_it(tmp_path, mnist, manual_dir, data_dir,
                                                          run_in_process):
  """`experiments.kd`: the teacher's steps and every student row's, announced first and counted
  by one progress bar (its ETA is the job's)."""
  import re

  from kip.data import fit_preprocessor
  from kip.io import DistilledSet, save_distilled

  pre = fit_preprocessor(mnist["train"].images)
  images = pre.apply(mnist["train"].images[:20])
  support = tmp_path / "set.npz"
  save_distilled(str(support), DistilledSet(images, None, {"dataset": "mnist", "step": 0}, pre,
                                            targets=np.zeros((20, 4), np.float32)))
  out = run_in_process("experiments.kd", "--support", str(support), "--dataset", "mnist",
                       "--rows", "distilled,gaussian", "--width", "4", "--teacher-steps", "10",
                       "--steps", "10", "--seeds", "1", "--workdir", str(tmp_path / "kd"),
                       "--manual-dir", manual_dir, "--data-dir", data_dir, "--progress")
  assert out.returncode == 0, out.stderr
  assert ("the job: the teacher classifier 10 steps, then 2 student rows of 10 steps: 30 steps"
          in out.stderr)
  assert {int(n) for n in re.findall(r" (\d+)/30\b", out.stderr)} >= {10, 20, 30}
  assert not re.findall(r" \d+/10\b", out.stderr)  # no bar counts one part alone
