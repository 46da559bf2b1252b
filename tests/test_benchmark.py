"""Coreset baselines (methods/coreset.py) and the benchmark command (experiments.benchmark)."""

import fcntl
import itertools
import json
import os
import pathlib
import shutil
import threading
import time

import numpy as np
import pytest

from methods.coreset import herding, k_center, select

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "formats" / "res_DM_MNIST_ConvNet_1ipc.pt"


def test_herding_follows_the_mean():
  x = np.random.default_rng(0).normal(size=(30, 5))
  order = herding(x, 30)
  assert sorted(order) == list(range(30))  # all of them, each once
  mean = x.mean(0)
  assert order[0] == np.argmin(np.linalg.norm(x - mean, axis=1))
  # Herding's running mean approaches the class mean faster than a random order's does.
  gap = [np.linalg.norm(x[order[:t]].mean(0) - mean) for t in (5, 10, 20)]
  rand = np.random.default_rng(1).permutation(30)
  assert all(g < np.linalg.norm(x[rand[:t]].mean(0) - mean)
             for g, t in zip(gap, (5, 10, 20), strict=True))


def test_k_center_is_within_twice_the_optimal_radius():
  x = np.random.default_rng(2).normal(size=(10, 2))
  dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
  best = min(dist[:, list(c)].min(1).max() for c in itertools.combinations(range(10), 3))
  for seed in range(5):
    chosen = k_center(x, 3, np.random.default_rng(seed))
    assert len(set(chosen.tolist())) == 3
    assert dist[:, chosen].min(1).max() <= 2 * best + 1e-12


def test_select_is_class_balanced():
  labels = np.repeat(np.arange(3), 6)
  x = np.random.default_rng(3).normal(size=(18, 2, 2, 1))
  for selection in ("random", "herding", "kcenter"):
    idx = select(selection, x, labels, 2, 0, 3)
    assert len(set(idx.tolist())) == 6
    np.testing.assert_array_equal(labels[idx], [0, 0, 1, 1, 2, 2])
  with pytest.raises(ValueError, match="fewer than the 7"):
    select("herding", x, labels, 7, 0, 3)


@pytest.mark.slow
def test_benchmark_runs_reuses_and_resumes_cells(tmp_path, manual_dir, data_dir, run_in_process):
  readme = tmp_path / "README.md"
  readme.write_text("intro\n<!-- benchmark:begin -->\nold\n<!-- benchmark:end -->\nend\n")
  root = tmp_path / "bench"
  args = ["--methods", "", "--coresets", "herding", "--sets", f"noise={FIXTURE}", "--ipc", "1",
          "--nets", "mlp", "--seeds", "2", "--full-steps", "20", "--transfer-args",
          "--steps 20 --eval-every 10", "--root", str(root), "--readme", str(readme),
          "--archive", str(tmp_path / "kept"),
          "--in-process", "--no-progress", "--manual-dir", manual_dir, "--data-dir", data_dir]

  def run():
    out = run_in_process("experiments.benchmark", *args)
    assert out.returncode == 0, out.stderr
    return json.loads((root / "benchmark.json").read_text())

  first = run()
  assert [(r["method"], r["ipc"], r["set_status"], r["evaluation_status"])
          for r in first["rows"]] == [("herding", 1, "made", "made"),
                                      ("noise", 1, "reused", "made"),
                                      ("full", 0, "reused", "made")]
  assert all(len(r["test_acc"]) == (1 if r["kind"] == "full" else 2) for r in first["rows"])
  herding_json = root / "coreset-herding-mnist-ipc1" / "transfer-dc-mlp" / "transfer.json"
  assert first["rows"][0]["workdir"] == str(herding_json.parent)
  # A full-data budget other than the default is a row of its own.
  assert first["rows"][2]["workdir"] == str(root / "full-mnist-steps20" / "transfer-dc-mlp")
  assert (root / "benchmark.png").stat().st_size > 0
  table = (root / "benchmark.md").read_text()
  text = readme.read_text()
  assert "old" not in text and table in text and text.startswith("intro") and "end\n" in text
  assert "| full | mnist | all | mlp-128 | dc |" in table
  assert first["rows"][2]["published"] is None  # published figures are ConvNets'
  from experiments.benchmark import Cell, published

  full = Cell("full", "full", "mnist", 0, "w", "s")
  assert published(full, "convnet3-128")[0] == 99.6 and published(full, "mlp-128")[0] is None
  noise = Cell("set", "noise", "mnist", 1, "w", "s", 88.75)  # a DC file's recorded accuracy
  assert published(noise, "convnet3-128") == (88.75, "the authors', recorded in the file "
                                                     "(ConvNet)")

  # Everything finished: read back, nothing run again.
  stamp = herding_json.stat().st_mtime_ns
  second = run()
  assert second["commands_run"] == []
  assert {r["evaluation_status"] for r in second["rows"]} == {"reused"}
  assert [r["test_acc"] for r in second["rows"]] == [r["test_acc"] for r in first["rows"]]
  assert herding_json.stat().st_mtime_ns == stamp

  # Two processes share the cells: while another holds the herding cell (its lock, here taken by
  # a thread), this one goes on to the next cell (the imported set, whose evaluation is missing),
  # then waits; the other finishes herding and lets go, and it is read back, not redone.
  herding = herding_json.parents[1]
  shutil.move(herding, tmp_path / "elsewhere")
  noise_json = root / "imported-noise" / "transfer-dc-mlp" / "transfer.json"
  os.remove(noise_json)
  (root / ".locks").mkdir(exist_ok=True)
  other = open(root / ".locks" / f"{herding.name}.lock", "a")  # noqa: SIM115
  fcntl.flock(other, fcntl.LOCK_EX)

  def other_process():
    try:
      deadline = time.monotonic() + 300
      while not noise_json.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
      shutil.move(tmp_path / "elsewhere", herding)
    finally:
      fcntl.flock(other, fcntl.LOCK_UN)
      other.close()

  thread = threading.Thread(target=other_process)
  thread.start()
  out = run_in_process("experiments.benchmark", *args)
  thread.join()
  assert out.returncode == 0, out.stderr
  log = out.stderr
  assert log.index("another benchmark process is on it") < log.index("imported-noise") < log.index(
      "waiting for the other benchmark process to finish")
  shared = json.loads((root / "benchmark.json").read_text())
  assert len(shared["commands_run"]) == 1 and "imported-noise" in shared["commands_run"][0]
  assert [(r["method"], r["evaluation_status"]) for r in shared["rows"]] == [
      ("herding", "reused"), ("noise", "made"), ("full", "reused")]
  assert [r["test_acc"] for r in shared["rows"]] == [r["test_acc"] for r in first["rows"]]
  assert herding_json.stat().st_mtime_ns == stamp

  # A request that the finished cells do not answer (another evaluation length) is refused in
  # one line, not read back; another evaluation cadence is the same request.
  longer = [("--steps 30 --eval-every 20" if a == "--steps 20 --eval-every 10" else a)
            for a in args]
  out = run_in_process("experiments.benchmark", *longer)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "transfer-dc-mlp holds a transfer run with other settings (steps: 20 -> 30)" in out.stderr
  assert herding_json.stat().st_mtime_ns == stamp

  # A cell whose evaluation was cut short is the only one run again, and resumes; meanwhile
  # --table-only writes the table of the finished cells and lists the others (a method whose set
  # is not distilled yet too), running nothing and archiving nothing.
  os.remove(herding_json)
  kept_before = sorted(str(p) for p in (tmp_path / "kept").rglob("*"))
  with_dm = ["dm" if a == "" and args[i - 1] == "--methods" else a for i, a in enumerate(args)]
  out = run_in_process("experiments.benchmark", *with_dm, "--table-only")
  assert out.returncode == 0, out.stderr
  partial = json.loads((root / "benchmark.json").read_text())
  assert partial["commands_run"] == [] and not herding_json.exists()
  assert not (root / "dm-mnist-ipc1" / "distilled.npz").exists()
  assert [r["method"] for r in partial["rows"]] == ["noise", "full"]
  assert partial["pending"] == ["dm mnist ipc 1 dc mlp", "herding mnist ipc 1 dc mlp"]
  assert ("Not finished yet (2): dm mnist ipc 1 dc mlp; herding mnist ipc 1 dc mlp"
          in readme.read_text())
  assert sorted(str(p) for p in (tmp_path / "kept").rglob("*")) == kept_before
  third = run()
  assert len(third["commands_run"]) == 1 and "coreset-herding" in third["commands_run"][0]
  assert third["rows"][0]["test_acc"] == first["rows"][0]["test_acc"]

  # An evaluation cut off at step 10 on another machine, its progress archived there (what the
  # benchmark does every minute while a command runs): a fresh checkout resumes it from step 10
  # and ends with the uninterrupted run's accuracies.
  from experiments.benchmark import Config, archive_progress

  kept = tmp_path / "kept" / "coreset-herding-mnist-ipc1" / "transfer-dc-mlp"
  os.remove(herding_json)
  os.remove(kept / "transfer.json")
  os.remove(herding_json.parent / "distilled" / "checkpoints" / "ckpt_00000020.npz")
  archive_progress(str(herding_json.parent), Config(root=str(root), archive=str(kept.parents[1])))
  shutil.rmtree(root)
  out = run_in_process("experiments.benchmark", *args)
  assert out.returncode == 0, out.stderr
  assert "resuming from step 10" in out.stdout + out.stderr
  resumed = json.loads((root / "benchmark.json").read_text())
  assert resumed["rows"][0]["test_acc"] == first["rows"][0]["test_acc"]
  assert sorted(p.name for p in kept.iterdir()) == ["config.json", "transfer.json"]

  # A fresh checkout (no workdirs) restores the archived reports: only the coreset is remade,
  # and a dry run lists just that (the evaluation is read back: the coreset is remade the same).
  shutil.rmtree(root)
  out = run_in_process("experiments.benchmark", *args, "--table-only")
  assert out.returncode == 0, out.stderr
  restored = json.loads((root / "benchmark.json").read_text())
  assert restored["pending"] == [] and restored["commands_run"] == []
  assert [r["test_acc"] for r in restored["rows"]] == [r["test_acc"] for r in first["rows"]]
  assert not (root / "coreset-herding-mnist-ipc1" / "distilled.npz").exists()
  dry = run_in_process("experiments.benchmark", *args, "--dry-run")
  assert dry.returncode == 0, dry.stderr
  assert [line.split()[3] for line in (dry.stdout + dry.stderr).splitlines()
          if line.startswith("$ python")] == ["experiments.coreset"]
  fourth = run()
  assert [line.split()[2] for line in fourth["commands_run"]] == ["experiments.coreset"]
  assert [r["test_acc"] for r in fourth["rows"]] == [r["test_acc"] for r in first["rows"]]
  assert not (tmp_path / "kept" / "coreset-herding-mnist-ipc1" / "distilled.npz").exists()


def test_archive_keeps_finished_sets_and_experts_and_restores_only_missing_folders(tmp_path):
  from experiments.benchmark import Config, archive, distillation_finished, restore

  config = Config(root=str(tmp_path / "root"), archive=str(tmp_path / "kept"))
  workdir = tmp_path / "root" / "dm-mnist-ipc1"
  workdir.mkdir(parents=True)
  np.savez(workdir / "distilled.npz", images=np.ones((10, 2, 2, 1)), labels=np.eye(10))
  (workdir / "config.json").write_text(json.dumps({"steps": 3}))
  (workdir / "metrics.jsonl").write_text('{"step": 3, "wall_time": 7.0}\n')
  (workdir / "checkpoint").mkdir()  # resumable state: not kept
  archive(str(workdir), config)
  kept = tmp_path / "kept" / "dm-mnist-ipc1"
  assert sorted(p.name for p in kept.iterdir()) == ["config.json", "distilled.npz",
                                                    "metrics.jsonl"]
  stamp = (kept / "distilled.npz").stat().st_mtime_ns
  archive(str(workdir), config)  # unchanged files are not rewritten
  assert (kept / "distilled.npz").stat().st_mtime_ns == stamp

  shutil.rmtree(workdir)
  assert not distillation_finished(str(workdir))
  restore(str(workdir), config)
  assert distillation_finished(str(workdir))
  np.testing.assert_array_equal(np.load(workdir / "distilled.npz")["labels"], np.eye(10))

  # A workdir that exists (an interrupted run) is its own run's: nothing is copied into it.
  (workdir / "distilled.npz").unlink()
  restore(str(workdir), config)
  assert not (workdir / "distilled.npz").exists()

  # An expert store: its finished experts (and PAD's difficulty scores, which order the next
  # expert) are kept, not an expert in training.
  store = tmp_path / "runs" / "buffers" / "mnist-0123"
  (store / "work" / "expert_001").mkdir(parents=True)
  (store / "store.json").write_text("{}")
  np.save(store / "expert_000.npy", np.arange(6.0).reshape(2, 3))
  (store / "expert_000.json").write_text("{}")
  np.save(store / "difficulty.npy", np.array([0.5, 0.1]))
  archive(str(store), config)
  assert sorted(p.name for p in (tmp_path / "kept" / "buffers" / "mnist-0123").iterdir()) == [
      "difficulty.npy", "expert_000.json", "expert_000.npy", "store.json"]
  shutil.rmtree(store)
  restore(str(store), config)
  np.testing.assert_array_equal(np.load(store / "expert_000.npy"), np.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(np.load(store / "difficulty.npy"), [0.5, 0.1])
  assert not (store / "work").exists()


def test_the_archive_keeps_a_running_commands_latest_checkpoint_until_it_finishes(tmp_path):
  from experiments.benchmark import Config, archive, archive_progress, restore

  config = Config(root=str(tmp_path / "root"), archive=str(tmp_path / "kept"))
  workdir = tmp_path / "root" / "mtt-mnist-ipc50"
  tdir = workdir / "transfer-dc"

  def checkpoint(folder, step):
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    np.savez(folder / "checkpoints" / f"ckpt_{step:08d}.npz", step=np.asarray(step))
    with open(folder / "metrics.jsonl", "a") as f:
      f.write(json.dumps({"step": step}) + "\n")

  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "config.json").write_text('{"steps": 300}')
  (workdir / "work.tmp").write_text("not kept")
  checkpoint(workdir, 100)
  checkpoint(workdir, 200)
  archive_progress(str(workdir), config)
  kept = tmp_path / "kept" / "mtt-mnist-ipc50"
  assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
      "checkpoints/ckpt_00000200.npz", "config.json", "metrics.jsonl"]
  checkpoint(workdir, 300)  # the run goes on: the newer checkpoint replaces the older
  archive_progress(str(workdir), config)
  assert [p.name for p in (kept / "checkpoints").iterdir()] == ["ckpt_00000300.npz"]
  assert (kept / "metrics.jsonl").read_text().count("step") == 3

  # An evaluation's rows are folders of their own; a workdir's progress leaves them out.
  (tdir / "config.json").parent.mkdir()
  (tdir / "config.json").write_text("{}")
  checkpoint(tdir / "distilled", 400)
  archive_progress(str(tdir), config)
  archive_progress(str(workdir), config)
  assert (kept / "transfer-dc" / "distilled" / "checkpoints" / "ckpt_00000400.npz").exists()

  # A fresh checkout: each folder comes back with its progress, the evaluation on its own.
  shutil.rmtree(tmp_path / "root")
  restore(str(workdir), config)
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file()) == [
      "checkpoints/ckpt_00000300.npz", "config.json", "metrics.jsonl"]
  restore(str(tdir), config)
  assert int(np.load(tdir / "distilled" / "checkpoints" / "ckpt_00000400.npz")["step"]) == 400

  # Finished: the set's progress is dropped but not its evaluation's; then the evaluation's.
  np.savez(workdir / "distilled.npz", images=np.ones((10, 2, 2, 1)), labels=np.eye(10))
  archive(str(workdir), config)
  assert not (kept / "checkpoints").exists() and (kept / "transfer-dc" / "distilled").exists()
  (tdir / "transfer.json").write_text("{}")
  archive(str(tdir), config)
  assert sorted(p.name for p in (kept / "transfer-dc").iterdir()) == ["config.json",
                                                                      "transfer.json"]


def test_a_benchmark_stopped_mid_command_stops_the_command_and_keeps_its_progress(monkeypatch):
  import subprocess
  import time

  from experiments import benchmark

  children = []

  def popen(*args, **kwargs):
    children.append(real_popen(*args, **kwargs))
    return children[-1]

  kept = []

  def stopped_while_keeping(folder, config):  # Ctrl-C arrives during the first copy
    kept.append(folder)
    if len(kept) == 1:
      raise KeyboardInterrupt

  real_popen = subprocess.Popen
  monkeypatch.setattr(subprocess, "Popen", popen)
  monkeypatch.setattr(benchmark, "PROGRESS_EVERY", 0.2)
  monkeypatch.setattr(benchmark, "archive_progress", stopped_while_keeping)
  run = benchmark.Runner(benchmark.Config(progress=True))
  start = time.perf_counter()
  with pytest.raises(KeyboardInterrupt):
    run("timeit", "-n", "1", "import time; time.sleep(30)", watch="w")
  assert time.perf_counter() - start < 10 and children[0].poll() is not None  # stopped at once
  assert kept == ["w", "w"]  # and its progress kept once more as it stops


def test_a_finished_set_is_read_back_only_for_the_settings_it_was_made_with(tmp_path):
  import dataclasses

  from experiments import kip, transfer
  from experiments.benchmark import check_settings, distillation_finished
  from kip import cli

  workdir = tmp_path / "kip-mnist-ipc1"
  workdir.mkdir()
  made = cli.parse_config(kip.Config, ["--dataset", "mnist", "--ipc", "1", "--steps", "300"], "")
  recorded = dataclasses.asdict(made) | {"workdir": str(workdir), "job": "kip"}
  del recorded["reg"]  # a flag added after the run was made: its default then
  (workdir / "config.json").write_text(json.dumps(recorded))
  np.savez(workdir / "distilled.npz", images=np.ones((10, 2, 2, 1)), labels=np.eye(10))
  (workdir / "metrics.jsonl").write_text('{"step": 300}\n')
  args = ["--dataset", "mnist", "--ipc", "1", "--workdir", str(workdir)]

  wanted = check_settings(str(workdir), "experiments.kip", [*args, "--steps", "300"],
                          ignore=("steps",))
  assert distillation_finished(str(workdir), wanted.steps)
  # More steps: the same settings, not finished (the command extends the run).
  wanted = check_settings(str(workdir), "experiments.kip", [*args, "--steps", "500"],
                          ignore=("steps",))
  assert not distillation_finished(str(workdir), wanted.steps)
  # Another kernel or labels: refused, naming what differs; display flags are not settings.
  check_settings(str(workdir), "experiments.kip", [*args, "--steps", "300", "--no-progress"],
                 ignore=("steps",))
  with pytest.raises(cli.UserError, match=r"kip-mnist-ipc1 holds a kip run with other settings "
                     r"\(kernel: 'fc' -> 'conv', learn_labels: True -> False\)"):
    check_settings(str(workdir), "experiments.kip", [*args, "--steps", "300", "--kernel", "conv",
                                                     "--no-learn-labels"], ignore=("steps",))
  with pytest.raises(cli.UserError, match="other settings \\(reg: 1e-06 -> 0.001\\)"):
    check_settings(str(workdir), "experiments.kip", [*args, "--reg", "1e-3"], ignore=("steps",))

  # An evaluation is read back only for the set it evaluated: the set distilled further since
  # (more --steps) has other arrays, and its old evaluation is refused, not reported for it.
  tdir = workdir / "transfer-dc"
  tdir.mkdir()
  support = str(workdir / "distilled.npz")
  targs = ["--support", support, "--dataset", "mnist", "--protocol", "dc", "--seeds", "5",
           "--workdir", str(tdir)]
  evaluated = cli.parse_config(transfer.Config, targs, "")
  (tdir / "config.json").write_text(json.dumps(
      dataclasses.asdict(evaluated) | {"workdir": str(tdir), "job": "transfer",
                                       "inputs": {"support": cli.file_digest(support)}}))
  check_settings(str(tdir), "experiments.transfer", targs, inputs={"support": support})
  np.savez(support, images=np.ones((10, 2, 2, 1)), labels=np.eye(10), config=np.array("{}"))
  check_settings(str(tdir), "experiments.transfer", targs,  # re-saved, the same arrays
                 inputs={"support": support})
  # The same set reached by another path (another --root, absolute or relative) is read back.
  relative = os.path.relpath(support)
  check_settings(str(tdir), "experiments.transfer",
                 [relative if a == support else a for a in targs], inputs={"support": relative})
  np.savez(support, images=np.full((10, 2, 2, 1), 0.5), labels=np.eye(10))
  with pytest.raises(cli.UserError, match=r"transfer-dc holds a transfer run made from another "
                                          r"support \(its content changed since\)"):
    check_settings(str(tdir), "experiments.transfer", targs, inputs={"support": support})


@pytest.mark.parametrize("args, message", [
    (["--methods", "kipp"], "unknown method 'kipp'"),
    (["--coresets", "forgetting"], "unknown coreset 'forgetting'"),
    (["--ipc", "1,x"], "--ipc takes positive integers"),
    (["--sets", "missing.pt"], "missing.pt: no such file"),
    (["--methods", "", "--coresets", "", "--no-full"], "nothing to benchmark"),
])
def test_benchmark_bad_input_is_one_line(args, message, run_in_process, tmp_path):
  out = run_in_process("experiments.benchmark", *args, "--root", str(tmp_path))
  assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr


def test_lossless_names_the_smallest_set_within_a_point_of_full_data():
  from experiments.benchmark import lossless

  def row(kind, method, ipc, acc, time, steps=2000, batch=256):
    return {"kind": kind, "method": method, "dataset": "mnist", "protocol": "dc", "ipc": ipc,
            "net": "mlp-128", "test_acc_mean": acc, "train_time_per_net": time, "steps": steps,
            "images_per_net": steps * batch}

  rows = [row("full", "full", 0, 0.98, 100), row("method", "dm", 1, 0.6, 5),
          row("method", "dm", 50, 0.975, 20, 800), row("method", "dm", 100, 0.979, 30),
          row("coreset", "random", 10, 0.9, 5), row("method", "mtt", 10, 0.99, 250, 2000, 100)]
  lines = lossless(rows)
  assert lines[0].startswith("dm on mnist (dc, mlp-128; the full split trained 2000 steps): 50 "
                             "per class is within 1 point")
  # Counted in images processed (800 x 256 against 2,000 x 256), not in the measured seconds.
  assert ("204,800 images (800 steps, 20 s measured) against 512,000 (2000 steps, 100 s)"
          in lines[0])
  assert lines[0].endswith("60% less training")
  # 2,000 steps of 100 images: less training than the full row, though its measured wall time
  # (250 s, say on a shared machine) was longer; a row processing more images is "no saving".
  assert lines[1].startswith("mtt on mnist") and lines[1].endswith("61% less training")
  assert lossless([row("full", "full", 0, 0.98, 100),
                   row("method", "dm", 100, 0.979, 30, 4000)])[0].endswith(
      "2.0x the training (no saving)")
  # The methods that never get there share one line, with their best size.
  assert lines[2] == ("on mnist (dc, mlp-128; the full split trained 2000 steps) no size is "
                      "within 1 point of the full data's 98.00%; the best of each: random "
                      "90.00% (10 per class)") and len(lines) == 3


def test_an_imported_dc_file_carries_its_recorded_accuracy(tmp_path):
  from experiments.benchmark import Config, plan

  cells = plan(Config(methods="", coresets="", full=False, sets=f"noise={FIXTURE}",
                      root=str(tmp_path)))
  assert [(c.kind, c.name, c.dataset, c.ipc) for c in cells] == [("set", "noise", "mnist", 1)]
  assert cells[0].recorded == pytest.approx(88.75)  # mean of the file's ConvNet [0.875, 0.9]
