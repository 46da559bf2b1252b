"""The command lines end to end on real MNIST at a small size, and their one-line errors."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
from conftest import run_cli, xla_flags_with_devices

from kip.io import load_distilled
from kip.loop import read_metrics

pytestmark = pytest.mark.slow


def kip_args(workdir, manual_dir, data_dir, steps):
  return ["--dataset", "mnist", "--ipc", "2", "--kernel", "fc", "--steps", str(steps),
          "--target-batch", "500", "--eval-every", "10", "--checkpoint-every", "10",
          "--workdir", str(workdir), "--manual-dir", manual_dir, "--data-dir", data_dir,
          "--no-progress"]


def test_kip_command_distils_real_mnist_and_resumes(tmp_path, manual_dir, data_dir, run_in_process):
  full = run_in_process("experiments.kip", *kip_args(tmp_path / "full", manual_dir, data_dir, 30))
  assert full.returncode == 0, full.stderr
  assert "final KRR test accuracy" in full.stdout
  for name in ("config.json", "metrics.jsonl", "distilled.npz", "checkpoints"):
    assert (tmp_path / "full" / name).exists()
  records = read_metrics(tmp_path / "full" / "metrics.jsonl")
  evals = [r for r in records if "test_acc" in r]
  assert [r["step"] for r in evals] == [0, 10, 20, 30]
  # Step 0 is the random class-balanced real subset: KIP must beat it clearly.
  assert evals[-1]["test_acc"] > evals[0]["test_acc"] + 0.05
  assert records[-1]["loss"] < records[1]["loss"]
  distilled = load_distilled(str(tmp_path / "full" / "distilled.npz"), "mnist")
  assert distilled.images.shape == (20, 28, 28, 1) and distilled.meta["step"] == 30

  # The same command in two sittings (stopped after 20 steps, then run to 30) ends the same.
  part = run_in_process("experiments.kip", *kip_args(tmp_path / "part", manual_dir, data_dir, 20))
  assert part.returncode == 0, part.stderr
  rest = run_in_process("experiments.kip", *kip_args(tmp_path / "part", manual_dir, data_dir, 30))
  assert rest.returncode == 0 and "resuming from step 20" in rest.stderr
  resumed = load_distilled(str(tmp_path / "part" / "distilled.npz"), "mnist")
  np.testing.assert_allclose(resumed.images, distilled.images, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(resumed.labels, distilled.labels, rtol=1e-5, atol=1e-6)

  # evaluate reproduces the run's own final accuracy from the file alone.
  ev = run_in_process("experiments.evaluate", "--support", str(tmp_path / "full" / "distilled.npz"),
                      "--dataset", "mnist", "--kernel", "fc", "--data-dir", data_dir, "--json-out")
  assert ev.returncode == 0, ev.stderr
  assert json.loads(ev.stdout)["test_acc"] == pytest.approx(evals[-1]["test_acc"], abs=2e-4)

  # A different setting in the same workdir is refused in one line.
  clash = run_in_process("experiments.kip", *kip_args(tmp_path / "full", manual_dir, data_dir, 30),
                         "--lr", "0.1")
  assert clash.returncode == 2 and "other settings (lr: 0.04 -> 0.1)" in clash.stderr
  assert "Traceback" not in clash.stderr


def test_label_solve_beats_one_hot_labels(tmp_path, manual_dir, data_dir, run_in_process):
  out = run_in_process("experiments.label_solve", "--dataset", "mnist", "--ipc", "2", "--kernel",
                       "fc", "--target-size", "5000", "--workdir", str(tmp_path), "--manual-dir",
                       manual_dir, "--data-dir", data_dir, "--no-progress")
  assert out.returncode == 0, out.stderr
  records = {r["labels"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
  assert records["label_solve"]["test_acc"] > records["one_hot"]["test_acc"]
  assert load_distilled(str(tmp_path / "distilled.npz")).labels.shape == (20, 10)


def test_evaluate_a_released_layout_set(tmp_path, mnist, data_dir, run_in_process):
  """A file with only `images` and `labels`, named as the authors name theirs (nozca): the test
  split gets standardisation fitted on train, and real images score as they should."""
  from kip.data import centered_one_hot, class_balanced_indices, fit_preprocessor

  train = mnist["train"]
  idx = class_balanced_indices(train.labels, 10, np.random.default_rng(0))
  images = fit_preprocessor(train.images).apply(train.images[idx])
  folder = tmp_path / "kip" / "mnist"
  folder.mkdir(parents=True)
  path = folder / "ConvNet_ssize100_nozca_nol_noaug_ckpt0.npz"
  np.savez(path, images=images, labels=centered_one_hot(train.labels[idx], 10))
  out = run_in_process("experiments.evaluate", "--support", str(path), "--dataset", "mnist",
                       "--data-dir", data_dir, "--json-out")
  assert out.returncode == 0, out.stderr
  assert 0.6 < json.loads(out.stdout)["test_acc"] < 0.9  # 10 real images per class, FC NTK


@pytest.mark.parametrize("module, args, message", [
    ("experiments.kip", ["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    ("experiments.kip", ["--kernel", "resnet"], "invalid choice: 'resnet'"),
    ("experiments.kip", ["--ipc", "ten"], "invalid int value"),
    ("experiments.evaluate", ["--support", "missing.npz"], "missing.npz: no such file"),
    ("experiments.label_solve", ["--support", "missing.npz"], "missing.npz: no such file"),
    ("experiments.kip", ["--memory-mb", "-5"], "--memory-mb must be at least 0"),
    ("experiments.kip", ["--lr", "-1"], "--lr must be greater than 0"),
    ("experiments.kip", ["--eval-every", "-1"], "--eval-every must be at least 0"),
    ("experiments.label_solve", ["--ipc", "0"], "--ipc must be at least 1"),
    ("experiments.label_solve", ["--ipc", "-1"], "--ipc must be at least 1"),
    ("experiments.evaluate", ["--support", "x.npz", "--reg", "-1"], "--reg must be at least 0"),
    ("experiments.frepo", ["--preset", "huge"], "invalid choice: 'huge'"),
    ("experiments.rfad", ["--jitter", "-1"], "--jitter must be at least 0"),
    ("experiments.kip", ["--zca"], "unrecognized arguments: --zca"),
])
def test_bad_input_gets_one_line_and_nonzero_exit(tmp_path, run_in_process, module, args,
                                                  message):
  out = run_in_process(module, *args, "--workdir", str(tmp_path / "w")) if module != \
      "experiments.evaluate" else run_in_process(module, *args)
  assert out.returncode == 2
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and message in lines[0], out.stderr
  assert not (tmp_path / "w").exists()  # nothing left behind


@pytest.mark.parametrize("module", ["experiments.kip", "experiments.label_solve",
                                    "experiments.transfer", "experiments.frepo"])
def test_a_workdir_that_cannot_be_a_folder_is_one_line(tmp_path, run_in_process, module):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  support = tmp_path / "s.npz"  # transfer reads its set before the workdir: a readable one
  np.savez(support, images=np.zeros((10, 28, 28, 1), np.float32),
           labels=np.eye(10, dtype=np.float32))
  for workdir, message in ((blocker, "is a file, not a folder"),
                           (blocker / "run", "which is a file")):
    out = run_in_process(module, "--workdir", str(workdir), "--support", str(support)) if \
        module == "experiments.transfer" else run_in_process(module, "--workdir", str(workdir))
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr


def test_malformed_file_is_rejected_in_one_line(tmp_path, run_in_process):
  path = tmp_path / "nchw.npz"
  np.savez(path, images=np.zeros((10, 1, 28, 28)), labels=np.zeros((10, 10)))
  out = run_in_process("experiments.evaluate", "--support", str(path), "--dataset", "mnist")
  assert out.returncode == 2 and "NCHW" in out.stderr and "Traceback" not in out.stderr


def test_ctrl_c_mid_run_then_rerun_matches_an_uninterrupted_run(tmp_path, manual_dir, data_dir,
                                                                run_in_process):
  """A real interrupt of the real command (SIGINT once a checkpoint exists), then the same
  command again: it resumes and ends with the uninterrupted run's distilled set. (The rerun and
  the uninterrupted run go through the command's `main` in this process: no interpreter start.)"""
  import signal
  import subprocess
  import sys
  import time

  from conftest import ROOT

  def args(workdir):
    return ["--dataset", "mnist", "--ipc", "1", "--steps", "200", "--target-batch", "200",
            "--eval-every", "100", "--checkpoint-every", "5", "--workdir", str(workdir),
            "--manual-dir", manual_dir, "--data-dir", data_dir, "--no-progress"]

  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  # A shell that started this test in the background (`cmd &`) makes SIGINT ignored, and a child
  # Python would inherit that and never raise KeyboardInterrupt: give it the default back.
  proc = subprocess.Popen([sys.executable, "-m", "experiments.kip", *args(tmp_path / "cut")],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                      signal.SIG_DFL))
  # Interrupt once a checkpoint exists (from then on the two newest always do): a fixed one
  # would be deleted again within milliseconds at the speed of an fc step.
  deadline = time.time() + 300
  while not list((tmp_path / "cut" / "checkpoints").glob("ckpt_*.npz")):
    assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint"
    time.sleep(0.02)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  cut_at = read_metrics(tmp_path / "cut" / "metrics.jsonl")[-1]["step"]
  assert proc.returncode == 130 and "re-run the same command" in err, err
  assert cut_at < 200  # it really stopped part-way

  again = run_in_process("experiments.kip", *args(tmp_path / "cut"))
  assert again.returncode == 0 and "resuming from step" in again.stderr, again.stderr
  straight = run_in_process("experiments.kip", *args(tmp_path / "straight"))
  assert straight.returncode == 0, straight.stderr
  a = load_distilled(str(tmp_path / "cut" / "distilled.npz"))
  b = load_distilled(str(tmp_path / "straight" / "distilled.npz"))
  assert a.meta["step"] == b.meta["step"] == 200
  np.testing.assert_allclose(a.images, b.images, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a.labels, b.labels, rtol=1e-5, atol=1e-6)
  steps = [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")]
  assert steps == list(range(201))


def test_distributed_without_a_workdir_is_refused_in_one_line():
  out = run_cli("experiments.kip", "--distributed")
  assert out.returncode == 2
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "--distributed needs --workdir" in lines[0], out.stderr


def test_conv_kernel_on_two_devices_within_a_memory_budget(tmp_path, manual_dir, data_dir):
  """A conv kernel (per-pixel variances) on 28x28 MNIST, sharded over two simulated devices, in
  tiles that fit a 1 MiB budget and recomputed in the backward pass: it runs, says so, and writes
  a distilled set whose KRR accuracy is reported. (The pooled ConvNets' full covariances take the
  same path at ~6x the time here, 70 s; test_sharding checks their tiled values and gradients
  against plain autodiff, and their tile sizes against XLA's buffers.)"""
  out = run_cli("experiments.kip", "--dataset", "mnist", "--kernel", "conv", "--ipc", "1",
                "--target-batch", "3", "--steps", "1", "--val-size", "10", "--memory-mb", "1",
                "--workdir", str(tmp_path / "w"), "--manual-dir", manual_dir, "--data-dir",
                data_dir, "--no-progress",
                env={"XLA_FLAGS": xla_flags_with_devices(2)})
  assert out.returncode == 0, out.stderr
  assert "devices: 2 x cpu" in out.stderr and "within 1 MiB per device" in out.stderr
  assert "K(support, support): 10 x 10 in tiles of" in out.stderr
  assert "recomputed in the backward pass" in out.stderr
  assert "peak host memory" in out.stderr
  records = read_metrics(tmp_path / "w" / "metrics.jsonl")
  assert [r["step"] for r in records] == [0, 1] and np.isfinite(records[1]["loss"])
  distilled = load_distilled(str(tmp_path / "w" / "distilled.npz"), "mnist")
  assert distilled.images.shape == (10, 28, 28, 1) and distilled.meta["kernel"] == "conv-ntk"


def test_preprocess_flags_are_one_spelling():
  from methods.flags import PreprocessConfig, SetPreprocessConfig, core_preprocessing

  assert PreprocessConfig().preprocessing() == "standard"
  assert PreprocessConfig(preprocess="kip_zca").preprocessing() == "kip_zca"
  assert core_preprocessing("kip_zca") == "layernorm_zca"  # the core's name for it
  assert SetPreprocessConfig().preprocessing() is None  # the set's own
  assert SetPreprocessConfig(preprocess="zca").preprocessing() == "zca"


def test_a_workdir_from_before_a_flag_existed_still_resumes(tmp_path):
  """config.json written before a flag existed (kip's had --zca, not --preprocess): the new flag
  at its default is the same run, so it resumes (and the file gains the key); another value is
  refused in one line."""
  from kip import cli
  from methods.kip import Config

  workdir = tmp_path / "old"
  cli.prepare_workdir(Config(workdir=str(workdir)), "kip", [])
  config = json.loads((workdir / "config.json").read_text())
  del config["preprocess"]
  (workdir / "config.json").write_text(json.dumps(config))
  cli.prepare_workdir(Config(workdir=str(workdir)), "kip", [])
  assert json.loads((workdir / "config.json").read_text())["preprocess"] == "standard"
  with pytest.raises(cli.UserError, match="preprocess: 'standard' -> 'zca'"):
    cli.prepare_workdir(Config(workdir=str(workdir), preprocess="zca"), "kip", [])


def test_a_workdir_made_from_another_input_file_is_refused(tmp_path):
  """transfer's rows are read back from its workdir: if the set at --support has changed since
  (e.g. its distillation was extended), the workdir is refused instead of reporting old rows."""
  import dataclasses

  from kip import cli

  @dataclasses.dataclass(frozen=True)
  class Config:
    support: str = ""
    workdir: str = ""

  support = tmp_path / "set.bin"
  support.write_bytes(b"first set")
  config = Config(str(support), str(tmp_path / "w"))
  assert cli.file_digest(str(support)) == hashlib.sha256(b"first set").hexdigest()
  cli.prepare_workdir(config, "t", [], inputs={"support": str(support)})
  cli.prepare_workdir(config, "t", [], inputs={"support": str(support)})  # same content: resumes
  # The same content at another path (moved, another --root) is the same input: its path is
  # not a setting once its content is recorded.
  moved = tmp_path / "elsewhere" / "set.bin"
  moved.parent.mkdir()
  moved.write_bytes(b"first set")
  cli.prepare_workdir(Config(str(moved), config.workdir), "t", [], inputs={"support": str(moved)})
  cli.prepare_workdir(config, "t", [], inputs={"support": str(support)})
  support.write_bytes(b"second set")
  with pytest.raises(cli.UserError, match="made from another support"):
    cli.prepare_workdir(config, "t", [], inputs={"support": str(support)})
  legacy = json.loads((tmp_path / "w" / "config.json").read_text())
  del legacy["inputs"]  # a workdir that recorded no digest is not taken on trust
  (tmp_path / "w" / "config.json").write_text(json.dumps(legacy))
  with pytest.raises(cli.UserError, match="made from another support"):
    cli.prepare_workdir(config, "t", [], inputs={"support": str(support)})

  # An .npz by its arrays: the same arrays saved again (other bytes) keep the digest,
  # other values do not.
  npz = tmp_path / "set.npz"
  np.savez(npz, images=np.ones((2, 3)), labels=np.eye(2))
  config = Config(str(npz), str(tmp_path / "n"))
  cli.prepare_workdir(config, "t", [], inputs={"support": str(npz)})
  recorded = json.loads((tmp_path / "n" / "config.json").read_text())["inputs"]["support"]
  expected = hashlib.sha256()
  for name, a in (("images", np.ones((2, 3))), ("labels", np.eye(2))):
    expected.update(f"{name}:{a.dtype.str}:{a.shape};".encode() + a.tobytes())
  assert recorded == "npz:" + expected.hexdigest()
  before = npz.read_bytes()
  np.savez(npz, labels=np.eye(2), images=np.ones((2, 3)))  # the same arrays, other bytes
  assert npz.read_bytes() != before
  cli.prepare_workdir(config, "t", [], inputs={"support": str(npz)})
  np.savez(npz, images=np.zeros((2, 3)), labels=np.eye(2))
  with pytest.raises(cli.UserError, match="made from another support"):
    cli.prepare_workdir(config, "t", [], inputs={"support": str(npz)})


def test_format_table_pads_every_column_to_its_widest_cell():
  from kip.cli import format_table, percent

  table = format_table(("set", "acc (%)"), [("distilled", percent(0.97123, 0.0034)),
                                            ("random", percent(0.9, 0.0))])
  assert table.splitlines() == ["set        acc (%)",
                                "---------  -------------",
                                "distilled  97.12 +- 0.34",
                                "random     90.00 +- 0.00"]


def test_a_flag_added_with_a_new_default_reads_old_runs_as_they_ran():
  """A setting missing from a recorded config counts as its default, unless the config class
  says what runs recorded before the flag had (RFAD's pixel map: none; FRePo's momentum: 0.9)."""
  from kip.cli import changed_settings
  from methods import datadam, frepo, rfad

  for module, name, before in ((rfad, "transform_lr", 0.0), (frepo, "bn_momentum", 0.9),
                               (datadam, "norm_groups", "class")):
    config = module.Config()
    current = dataclasses.asdict(config)
    old = {k: v for k, v in current.items() if k != name}
    assert changed_settings(old, current, config, ()) == [name]
    assert changed_settings(old, current | {name: before},
                            dataclasses.replace(config, **{name: before}), ()) == []


def test_sigterm_says_where_the_work_is_and_how_to_resume(tmp_path, manual_dir, data_dir):
  """SIGTERM (a scheduler's stop) mid-run: exit 143, one line naming the workdir and the resume,
  and the checkpoint it left is there (test_ctrl_c_... shows that a re-run resumes from one)."""
  import signal
  import subprocess
  import sys
  import time

  from conftest import ROOT

  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "experiments.kip", "--dataset", "mnist", "--ipc", "1",
             "--steps", "100000", "--target-batch", "200", "--eval-every", "100000",
             "--checkpoint-every", "5", "--workdir", str(workdir), "--manual-dir", manual_dir,
             "--data-dir", data_dir, "--no-progress"]
  proc = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not list((workdir / "checkpoints").glob("ckpt_*.npz")):
    assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint"
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  last = err.strip().splitlines()[-1]
  assert proc.returncode == 143, err
  assert last == (f"stopped by SIGTERM; its finished work is kept in {workdir}: re-run the same "
                  f"command with --workdir {workdir} to resume"), err
  assert "Traceback" not in err
  assert list((workdir / "checkpoints").glob("ckpt_*.npz"))


def test_help_shows_every_default_in_one_style():
  """Commands with presets and without write defaults the same way, each preset's value beside
  it where it differs, and an empty default (a flag whose absence the help explains) not at all."""
  for command in ("experiments.kip", "experiments.frepo"):
    out = run_cli(command, "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert "[default" not in text and "(default: )" not in text, text
    assert "--dataset {mnist," in text and "(default: mnist)" in text
  assert "(default: 100; paper: 1000)" in text  # frepo's --checkpoint-every
