"""Coreset baselines (methods/coreset.py) and the benchmark command (experiments.benchmark)."""

import fcntl
import itertools
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ROOT

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
  readme = tmp_path / "results.md"
  readme.write_text("intro\n<!-- benchmark:begin -->\nold\n<!-- benchmark:end -->\nend\n")
  root, kept = tmp_path / "bench", tmp_path / "kept"
  args = ["--methods", "", "--coresets", "herding", "--sets", f"noise={FIXTURE}", "--ipc", "1",
          "--nets", "mlp", "--seeds", "2", "--full-steps", "20", "--transfer-args",
          "--steps 20 --eval-every 10", "--root", str(root), "--readme", str(readme),
          "--archive", str(kept), "--no-progress", "--manual-dir", manual_dir,
          "--data-dir", data_dir]

  def run(*more):
    out = run_in_process("experiments.benchmark", *args, *more)
    assert out.returncode == 0, out.stderr
    return json.loads((root / "benchmark.json").read_text())

  first = run()
  assert [(r["method"], r["ipc"], r["set_status"], r["evaluation_status"])
          for r in first["rows"]] == [("herding", 1, "made", "made"),
                                      ("noise", 1, "reused", "made"),
                                      ("full", 0, "made", "made")]
  assert all(len(r["test_acc"]) == (1 if r["kind"] == "full" else 2) for r in first["rows"])
  herding_json = root / "coreset-herding-mnist-ipc1" / "transfer-dc-mlp" / "transfer.json"
  assert first["rows"][0]["workdir"] == str(herding_json.parent)
  # A full-data budget other than the default is a row of its own, its network sized by a
  # random set of its own.
  full = root / "full-mnist-steps20"
  assert first["rows"][2]["workdir"] == str(full / "transfer-dc-mlp")
  assert (full / "support" / "distilled.npz").exists()
  assert (root / "benchmark.png").stat().st_size > 0
  table = (root / "benchmark.md").read_text()
  text = readme.read_text()
  assert "old" not in text and table in text and text.startswith("intro") and "end\n" in text
  assert "| full | mnist | all | mlp-128 | dc |" in table
  assert first["rows"][2]["published"] is None  # published figures are ConvNets'
  from evaluation.benchmark import Cell, published

  full_cell = Cell("full", "full", "mnist", 0, "w", "s")
  assert published(full_cell, "convnet3-128") == (99.6, "DC/DM ConvNet-3")
  assert published(full_cell, "mlp-128")[0] is None
  noise = Cell("set", "noise", "mnist", 1, "w", "s", 88.75)  # a DC file's recorded accuracy
  assert published(noise, "convnet3-128") == (88.75, "the authors', recorded in the file "
                                                     "(ConvNet)")
  # The archive keeps the evaluations' reports, not a coreset's images nor any checkpoint.
  assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
      f"{cell}/transfer-dc-mlp/{name}"
      for cell in ("coreset-herding-mnist-ipc1", "full-mnist-steps20", "imported-noise")
      for name in ("config.json", "transfer.json")]

  # Everything finished: read back, nothing run again.
  stamp = herding_json.stat().st_mtime_ns
  second = run()
  assert second["commands_run"] == []
  assert {r["evaluation_status"] for r in second["rows"]} == {"reused"}
  assert [r["test_acc"] for r in second["rows"]] == [r["test_acc"] for r in first["rows"]]
  assert herding_json.stat().st_mtime_ns == stamp

  # A request that the finished cells do not answer (another evaluation length) is refused in
  # one line, before anything runs; another evaluation cadence is the same request.
  longer = [("--steps 30 --eval-every 20" if a == "--steps 20 --eval-every 10" else a)
            for a in args]
  out = run_in_process("experiments.benchmark", *longer)
  assert out.returncode != 0 and "Traceback" not in out.stderr and "$ python" not in out.stderr
  assert "transfer-dc-mlp holds a transfer run with other settings (steps: 20 -> 30)" in out.stderr
  assert herding_json.stat().st_mtime_ns == stamp

  # A cell whose evaluation was cut short (no report here nor in the archive) is the only one
  # run again, and resumes; meanwhile --table-only writes the table of the finished cells and
  # lists the others (a method whose set is not distilled yet too), running nothing and
  # archiving nothing.
  os.remove(herding_json)
  os.remove(kept / "coreset-herding-mnist-ipc1" / "transfer-dc-mlp" / "transfer.json")
  kept_before = sorted(str(p) for p in kept.rglob("*"))
  with_dm = ["dm" if a == "" and args[i - 1] == "--methods" else a for i, a in enumerate(args)]
  out = run_in_process("experiments.benchmark", *with_dm, "--table-only")
  assert out.returncode == 0, out.stderr
  partial = json.loads((root / "benchmark.json").read_text())
  assert partial["commands_run"] == [] and not herding_json.exists()
  assert not (root / "dm-mnist-ipc1").exists()
  assert [r["method"] for r in partial["rows"]] == ["noise", "full"]
  assert partial["pending"] == ["dm mnist ipc 1 dc mlp", "herding mnist ipc 1 dc mlp"]
  assert ("Not finished yet (2): dm mnist ipc 1 dc mlp; herding mnist ipc 1 dc mlp"
          in readme.read_text())
  assert sorted(str(p) for p in kept.rglob("*")) == kept_before
  third = run()
  assert len(third["commands_run"]) == 1 and "coreset-herding" in third["commands_run"][0]
  assert third["rows"][0]["test_acc"] == first["rows"][0]["test_acc"]
  assert (kept / "coreset-herding-mnist-ipc1" / "transfer-dc-mlp" / "transfer.json").exists()

  # A fresh checkout (no workdirs): the table is read back from the archive, and nothing runs
  # (an evaluation read back needs no set: the coreset is not remade).
  shutil.rmtree(root)
  restored = run("--table-only")
  assert restored["pending"] == [] and restored["commands_run"] == []
  assert [r["test_acc"] for r in restored["rows"]] == [r["test_acc"] for r in first["rows"]]
  assert {r["workdir"].startswith(str(kept)) for r in restored["rows"]} == {True}
  dry = run_in_process("experiments.benchmark", *args, "--dry-run")
  assert dry.returncode == 0 and "$ python" not in dry.stdout + dry.stderr, dry.stderr
  fourth = run()
  assert fourth["commands_run"] == [] and not (root / "coreset-herding-mnist-ipc1").exists()
  assert [r["test_acc"] for r in fourth["rows"]] == [r["test_acc"] for r in first["rows"]]


def test_the_table_prints_from_the_committed_summaries_without_runs(tmp_path, run_in_process):
  """The committed table's own command (from its benchmark.json), run with --table-only on a
  checkout without runs/: every row read back from bench/results, the same rows as committed."""
  import dataclasses

  from evaluation.benchmark import Config, command_line

  committed = ROOT / "bench" / "results" / "benchmark"
  recorded = json.loads((committed / "benchmark.json").read_text())["config"]
  names = {f.name for f in dataclasses.fields(Config)}
  config = Config(**{k: v for k, v in recorded.items() if k in names})
  argv = command_line(config, root=str(tmp_path / "runs"), out=str(tmp_path / "out"),
                      archive=str(committed / "cells"), readme="", table_only=True)
  out = run_in_process("experiments.benchmark", *argv)
  assert out.returncode == 0, out.stderr
  result = json.loads((tmp_path / "out" / "benchmark.json").read_text())
  assert len(result["rows"]) == 50 and result["pending"] == [] and result["commands_run"] == []

  def rows(path):
    return [line for line in path.read_text().splitlines() if line.startswith(("|", "- "))]

  assert rows(tmp_path / "out" / "benchmark.md") == rows(committed / "benchmark.md")
  assert not (tmp_path / "runs").exists()


def test_bench_results_keeps_summaries_and_small_sets_only():
  """bench/results in git: under 5 MB; no checkpoint, expert store or run progress."""
  try:
    listed = subprocess.run(["git", "ls-files", "-z", "bench/results"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("not a git checkout")
  files = [f for f in listed if f and os.path.exists(ROOT / f)]
  assert sum(os.path.getsize(ROOT / f) for f in files) < 5_000_000
  assert not [f for f in files if "/cells/" in f and (
      os.path.basename(f) in ("metrics.jsonl", "store.json", "difficulty.npy")
      or "/checkpoints/" in f or "/buffers/" in f or "expert_" in f)]
  assert all(os.path.getsize(ROOT / f) <= 100_000 for f in files if f.endswith("distilled.npz"))
  # and .gitignore keeps them out (an expert store, a checkpoint, a run's metrics)
  ignored = subprocess.run(
      ["git", "check-ignore", "--no-index", "bench/results/b/cells/buffers/m/store.json",
       "bench/results/b/cells/dm-mnist-ipc1/checkpoints/ckpt_00000010.npz",
       "bench/results/b/cells/dm-mnist-ipc1/metrics.jsonl"], cwd=ROOT, capture_output=True,
      text=True).stdout.split()
  assert len(ignored) == 3


def test_the_archive_keeps_summaries_and_small_sets_and_restores_a_set(tmp_path):
  from evaluation.benchmark import Cell, Config, archive, distillation_finished, restore

  root, kept = tmp_path / "root", tmp_path / "kept"
  config = Config(root=str(root), archive=str(kept), nets="auto,mlp")

  def distilled(name, images):
    workdir = root / name
    (workdir / "checkpoints").mkdir(parents=True)  # resumable state: never kept
    (workdir / "checkpoints" / "ckpt_00000003.npz").write_bytes(b"state")
    np.savez(workdir / "distilled.npz", images=images, labels=np.eye(10))
    (workdir / "config.json").write_text(json.dumps({"steps": 3}))
    (workdir / "metrics.jsonl").write_text('{"step": 2, "loss": 0.5}\n'
                                           '{"step": 3, "wall_time": 7.0}\n')
    tdir = workdir / "transfer-dc"
    (tdir / "distilled" / "checkpoints").mkdir(parents=True)
    (tdir / "config.json").write_text("{}")
    (tdir / "transfer.json").write_text('{"rows": []}')
    return Cell("method", "dm", "mnist", 1, str(workdir), str(workdir / "distilled.npz"))

  cell = distilled("dm-mnist-ipc1", np.ones((10, 2, 2, 1)))
  (root / "dm-mnist-ipc1" / "transfer-dc-mlp").mkdir()  # an evaluation in progress: not kept
  archive(cell, config)
  assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
      "dm-mnist-ipc1/config.json", "dm-mnist-ipc1/distilled.npz",
      "dm-mnist-ipc1/final_metrics.json", "dm-mnist-ipc1/transfer-dc/config.json",
      "dm-mnist-ipc1/transfer-dc/transfer.json"]
  summary = kept / "dm-mnist-ipc1" / "final_metrics.json"
  assert json.loads(summary.read_text()) == {"step": 3, "loss": 0.5, "wall_time": 7.0}
  stamp = summary.stat().st_mtime_ns
  archive(cell, config)  # unchanged files are not rewritten
  assert summary.stat().st_mtime_ns == stamp
  # A set over 100 kB stays out of the archive; its summary is kept.
  large = distilled("dm-mnist-ipc50", np.ones((500, 28, 28, 1), np.float32))
  archive(large, config)
  assert sorted(p.name for p in (kept / "dm-mnist-ipc50").iterdir()) == [
      "config.json", "final_metrics.json", "transfer-dc"]

  # A fresh checkout: the archived summary counts as a finished set; restored when needed.
  shutil.rmtree(root)
  assert distillation_finished(str(kept / "dm-mnist-ipc1"))
  assert not distillation_finished(str(root / "dm-mnist-ipc1"))
  assert restore(cell, config) and distillation_finished(cell.workdir)
  np.testing.assert_array_equal(np.load(cell.support)["labels"], np.eye(10))
  assert not restore(large, config)  # its set was not kept: its command remakes it
  # A workdir that exists (an interrupted run) is its own run's: nothing is copied into it.
  os.remove(cell.support)
  assert not restore(cell, config) and not os.path.exists(cell.support)


@pytest.mark.slow
def test_a_stopped_runner_ends_its_command_and_starts_no_more():
  from evaluation.benchmark import Config, Runner
  from kip import cli

  run = Runner(Config(progress=True))
  threading.Timer(1.0, run.stop).start()
  start = time.perf_counter()
  with pytest.raises(cli.UserError, match="failed"):
    run("timeit", "-n", "1", "import time; time.sleep(60)")
  assert time.perf_counter() - start < 20
  with pytest.raises(cli.UserError, match="the benchmark is stopping"):
    run("timeit", "-n", "1", "pass")


def _children(pid: int) -> dict[int, str]:
  """The live processes whose parent is `pid` (Linux /proc): pid -> command line."""
  found = {}
  for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{entry}/stat") as f:
        state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
      if int(ppid) == pid and state != "Z":
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          found[int(entry)] = f.read().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
      pass
  return found


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _start(tmp_path, *args: str) -> subprocess.Popen:
  """`python -m experiments.benchmark args` in the background (its log in tmp_path/log)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
  # A suite started from a shell in the background (`make test &`) ignores SIGINT, and a child
  # would inherit that (Python keeps an ignored SIGINT ignored): the default back, then exec.
  default_sigint = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
  with open(tmp_path / "log", "w") as log:
    return subprocess.Popen([sys.executable, "-c", default_sigint, "-m", "experiments.benchmark",
                             *args, "--no-progress"], cwd=ROOT, env=env, stdout=log, stderr=log)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_killed_benchmark_takes_its_command_with_it(signum, tmp_path, manual_dir, data_dir):
  root = tmp_path / "bench"
  bench = _start(tmp_path, "--methods", "", "--coresets", "", "--no-full", "--sets",
                 f"noise={FIXTURE}", "--nets", "mlp", "--seeds", "1", "--transfer-args",
                 "--steps 1000000", "--root", str(root), "--manual-dir", manual_dir,
                 "--data-dir", data_dir)
  try:
    deadline = time.monotonic() + 120
    while not (command := [p for p, c in _children(bench.pid).items()
                           if "experiments.transfer" in c]):
      assert bench.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
      time.sleep(0.1)
    child = command[0]
    # The cell is locked, and its command holds the lock too (it inherited it).
    lock = root / ".locks" / "imported-noise.lock"
    assert str(lock) in {os.path.realpath(f"/proc/{child}/fd/{fd}")
                         for fd in os.listdir(f"/proc/{child}/fd")}
    with open(lock, "a") as f, pytest.raises(BlockingIOError):
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.kill(bench.pid, signum)
    try:
      bench.wait(timeout=60)
    except subprocess.TimeoutExpired:
      pytest.fail(f"the benchmark outlived signal {signum}: {(tmp_path / 'log').read_text()}")
    deadline = time.monotonic() + 15
    while _alive(child):
      assert time.monotonic() < deadline, f"the command {child} outlived the benchmark"
      time.sleep(0.1)
    with open(lock, "a") as f:  # let go with the command (the kernel may take a moment)
      while True:
        try:
          fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
          break
        except BlockingIOError:
          assert time.monotonic() < deadline, "the cell's lock outlived its command"
          time.sleep(0.1)
  finally:
    bench.kill()
    for pid in _children(bench.pid):
      os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_workers_run_cells_at_once(tmp_path, manual_dir, data_dir):
  root = tmp_path / "bench"
  bench = _start(tmp_path, "--methods", "", "--coresets", "", "--no-full", "--sets",
                 f"a={FIXTURE},b={FIXTURE}", "--nets", "mlp", "--seeds", "1", "--transfer-args",
                 "--steps 20 --eval-every 20", "--workers", "2", "--root", str(root),
                 "--manual-dir", manual_dir, "--data-dir", data_dir)
  most = 0
  try:
    while bench.poll() is None:
      most = max(most, sum("experiments.transfer" in c for c in _children(bench.pid).values()))
      time.sleep(0.05)
  finally:
    bench.kill()
  assert bench.returncode == 0, (tmp_path / "log").read_text()
  assert most == 2  # both cells' evaluations ran at the same time
  log = (tmp_path / "log").read_text()
  assert "the benchmark: 2 of 2 cells to run, 2 at a time" in log  # announced first
  assert "1 of 2 cells done in " in log and "2 of 2 cells done in " in log  # the ETA kept current
  rows = json.loads((root / "benchmark.json").read_text())["rows"]
  assert [(r["method"], r["evaluation_status"]) for r in rows] == [("a", "made"), ("b", "made")]


def test_slurm_writes_a_job_array_of_one_cell_per_task(tmp_path, run_in_process):
  script = tmp_path / "cells.sh"
  args = ["--methods", "dm,mtt", "--ipc", "1,10", "--coresets", "random", "--transfer-args",
          "--width 32", "--root", str(tmp_path / "bench")]
  out = run_in_process("experiments.benchmark", *args, "--slurm", str(script))
  assert out.returncode == 0, out.stderr
  assert not (tmp_path / "bench").exists()  # nothing ran
  text = script.read_text()
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  lines = text.splitlines()
  assert lines[0] == "#!/bin/bash"
  assert "#SBATCH --array=0-6" in lines  # 2 sizes x (2 methods + 1 coreset) + the full row
  cells = [line.split(": ", 1)[1] for line in lines if line.startswith("#   ") and ": " in line]
  assert len(cells) == 7
  (command,) = [line for line in lines if line.startswith("exec ")]
  words = shlex.split(command)
  assert words[-2:] == ["--cell", "$SLURM_ARRAY_TASK_ID"] and "--slurm" not in command
  # Each task's command runs that cell alone: its set and evaluation (and the store it needs).
  listed = []
  for index, cell in enumerate(cells):
    workdir = cell.rsplit("(", 1)[1].rstrip(")")
    dry = run_in_process("experiments.benchmark", *words[4:-2], "--cell", str(index),
                         "--dry-run")
    assert dry.returncode == 0, dry.stderr
    commands = dry.stdout.split("\n")[:-1]
    assert [c.split()[2] for c in commands][-2:] in (
        [["experiments.dm", "experiments.transfer"], ["experiments.mtt", "experiments.transfer"],
         ["experiments.coreset", "experiments.transfer"]])
    assert all(workdir in c for c in commands if "experiments.buffer" not in c)
    assert "--width 32" in commands[-1]
    listed.append(workdir)
  assert len(set(listed)) == 7


def test_a_finished_set_is_read_back_only_for_the_settings_it_was_made_with(tmp_path):
  import dataclasses

  from evaluation import transfer
  from evaluation.benchmark import check_settings, distillation_finished
  from kip import cli
  from methods import kip

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
    (["--ipc", "1,x"], "--ipc takes integers from 1 to 100000"),
    (["--ipc", "1," + "9" * 23], "--ipc takes integers from 1 to 100000"),
    (["--sets", "missing.pt"], "missing.pt: no such file"),
    (["--methods", "", "--coresets", "", "--no-full"], "nothing to benchmark"),
    (["--readme", "missing.md"], "--readme missing.md: No such file or directory"),
    (["--readme", "pyproject.toml"], "--readme pyproject.toml has no `<!-- benchmark:begin -->`"),
    (["--cell", "11"], "--cell 11: the plan has 11 cells (0 to 10)"),
])
def test_benchmark_bad_input_is_one_line(args, message, run_in_process, tmp_path):
  out = run_in_process("experiments.benchmark", *args, "--root", str(tmp_path))
  assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr


def test_lossless_names_the_smallest_set_within_a_point_of_full_data():
  from evaluation.benchmark import lossless

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
  from evaluation.benchmark import Config, plan

  cells = plan(Config(methods="", coresets="", full=False, sets=f"noise={FIXTURE}",
                      root=str(tmp_path)))
  assert [(c.kind, c.name, c.dataset, c.ipc) for c in cells] == [("set", "noise", "mnist", 1)]
  assert cells[0].recorded == pytest.approx(88.75)  # mean of the file's ConvNet [0.875, 0.9]


def test_a_new_method_joins_the_table_by_name_and_an_unknown_one_is_refused(tmp_path,
                                                                            run_in_process):
  # methods/moments.py and experiments/moments.py were added without touching the benchmark.
  dry = run_in_process("experiments.benchmark", "--methods", "moments", "--ipc", "1",
                       "--coresets", "", "--no-full", "--root", str(tmp_path), "--dry-run")
  assert dry.returncode == 0, dry.stderr
  commands = dry.stdout.split("\n")[:-1]
  assert [c.split()[2] for c in commands] == ["experiments.moments", "experiments.transfer"]
  assert "experiments.moments" not in dry.stderr, dry.stderr  # the plan is printed once
  assert "--preset" not in commands[0]  # moments' JOB has no presets
  bad = run_in_process("experiments.benchmark", "--methods", "nosuch", "--dry-run")
  assert bad.returncode == 2 and "unknown method 'nosuch'" in bad.stderr


def test_a_gap_only_against_a_figure_measured_the_same_way():
  from evaluation.benchmark import Cell, _figure, add_over_random, comparable

  dm = _figure(Cell("method", "dm", "mnist", 1, "w", "s"), "convnet3")
  assert (dm["value"], dm["protocol"], dm["width"]) == (89.7, "dsa", 128)
  assert comparable(dm, "dsa", "convnet3-128")
  assert not comparable(dm, "dc", "convnet3-128")  # another protocol
  assert not comparable(dm, "dsa", "convnet3-32")  # the CPU column's width
  kip = _figure(Cell("method", "kip", "mnist", 10, "w", "s"), "convnet")
  assert comparable(kip, "kip", "convnet-1024") and not comparable(kip, "kip", "convnet-128")
  ls = _figure(Cell("method", "label_solve", "mnist", 10, "w", "s"), "convnet3")
  assert ls["protocol"] is None and not comparable(ls, "dc", "convnet3-128")
  rows = [{"kind": k, "method": m, "dataset": "mnist", "ipc": ipc, "protocol": "dc",
           "net": "convnet3-32", "test_acc_mean": acc, "over_random": None}
          for k, m, ipc, acc in (("method", "dm", 1, 0.9214), ("coreset", "random", 1, 0.6460),
                                 ("method", "dm", 10, 0.9570), ("full", "full", 0, 0.9891))]
  add_over_random(rows)
  assert rows[0]["over_random"] == pytest.approx(27.54)
  assert rows[1]["over_random"] is None  # random itself
  assert rows[2]["over_random"] is None  # no random row of that size
  assert rows[3]["over_random"] is None


def test_fair_evaluations_and_the_robust_scores_by_hand():
  import math

  from evaluation.benchmark import (
    Cell,
    Config,
    add_robust_scores,
    evaluations,
    fair_table,
    transfer_command,
  )

  config = Config(fair=True, protocol="dc", nets="auto")
  dm = Cell("method", "dm", "mnist", 1, "runs/b/dm-mnist-ipc1", "runs/b/dm/distilled.npz")
  random = Cell("coreset", "random", "mnist", 1, "runs/b/r", "runs/b/r/distilled.npz")
  herding = Cell("coreset", "herding", "mnist", 1, "runs/b/h", "runs/b/h/distilled.npz")
  assert evaluations(config, dm) == [("dc", "auto", ""), ("dc", "auto", "hard"),
                                     ("dc", "auto", "noaug")]
  assert evaluations(config, random) == [("dc", "auto", ""), ("dc", "auto", "noaug")]
  assert evaluations(config, herding) == [("dc", "auto", "")]
  hard = transfer_command(dm, "dc", "auto", config, "hard")
  assert hard[-2:] == ["--labels", "hard"] and "transfer-dc-hard" in " ".join(hard)
  assert transfer_command(dm, "dc", "auto", config, "noaug")[-2:] == ["--augment", "none"]

  def row(kind, method, ipc, acc, variant=""):
    return {"kind": kind, "method": method, "dataset": "mnist", "ipc": ipc, "protocol": "dc",
            "net": "convnet3-128", "test_acc_mean": acc, "variant": variant}

  rows = [row("method", "frepo", 1, 0.80), row("method", "frepo", 1, 0.70, "hard"),
          row("method", "frepo", 1, 0.75, "noaug"), row("coreset", "random", 1, 0.60),
          row("coreset", "random", 1, 0.65, "noaug"), row("full", "full", 0, 0.99)]
  add_robust_scores(rows)
  scored = rows[0]
  # HLR = 0.99 - 0.70 = 0.29, IOR = 0.80 - 0.60 = 0.20, a = 0.5 (0.20 - 0.29) = -0.045:
  # LRS = 100 (e^-0.045 - e^-1) / (e - e^-1) = 100 (0.9559975 - 0.3678794) / 2.3504024.
  assert scored["lrs"]["hlr"] == pytest.approx(0.29) and scored["lrs"]["ior"] == pytest.approx(0.2)
  assert scored["lrs"]["lrs"] == pytest.approx(25.02202, abs=1e-4)
  # b = 0.5 (0.80 - 0.60) + 0.5 (0.75 - 0.65) = 0.15: ARS 33.77953 (tests/test_scores.py).
  assert scored["ars"]["ars"] == pytest.approx(33.77953, abs=1e-4)
  assert "lrs" not in rows[1] and "lrs" not in rows[3]  # variants and baselines carry none
  table = fair_table(rows)
  assert table[2] == ("| frepo | mnist | 1 | convnet3-128 | dc | 80.00 | 70.00 | +29.00 | +20.00 "
                      "| 25.0 | 75.00 | 33.8 |")
  assert not math.isnan(scored["lrs"]["lrs"])


def test_paper_protocol_is_each_methods_own_and_the_baselines_follow():
  from evaluation.benchmark import Cell, Config, evaluations

  config = Config(methods="kip,dm,frepo", protocol="paper,dc")
  cell = lambda kind, name, support="s/distilled.npz": Cell(  # noqa: E731
      kind, name, "mnist", 1, "w", support)
  assert [e[0] for e in evaluations(config, cell("method", "kip"))] == ["kip", "dc"]
  assert [e[0] for e in evaluations(config, cell("method", "dm"))] == ["dsa", "dc"]
  assert [e[0] for e in evaluations(config, cell("method", "frepo"))] == ["frepo", "dc"]
  assert [e[0] for e in evaluations(config, cell("coreset", "random"))] == [
      "kip", "dsa", "frepo", "dc"]
  assert [e[0] for e in evaluations(config, cell("full", "full"))] == ["kip", "dsa", "frepo", "dc"]
  assert [e[0] for e in evaluations(config, cell("set", "x", "d/res_DM_MNIST_ConvNet_1ipc.pt"))
          ] == ["dsa", "dc"]
