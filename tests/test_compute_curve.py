"""bench.compute_curve's plan: every command is one its command accepts, budgets are multiples
of the CPU preset's steps, FRePo (a schedule over its steps) runs each budget afresh, the others
extend one run."""

import importlib

from bench import compute_curve
from kip import cli


def test_the_plan_is_commands_their_commands_accept(tmp_path):
  entries = compute_curve.plan(compute_curve.METHODS, [1, 10], [1, 2, 20], str(tmp_path),
                               "mnist")
  assert len(entries) == 4 * 2 * 3
  for e in entries:
    module, *args = e["distill"]
    job = importlib.import_module(module).JOB
    config = cli.parse_config(job.config, args, "", presets=job.presets)
    assert config.steps == compute_curve.PRESET_STEPS[e["method"]] * e["multiple"]
    if "preset" in job.config.__dataclass_fields__:
      assert config.preset == "cpu"
  frepo = {e["workdir"] for e in entries if e["method"] == "frepo" and e["ipc"] == 1}
  dm = {e["workdir"] for e in entries if e["method"] == "dm" and e["ipc"] == 1}
  assert len(frepo) == 3 and len(dm) == 1
  kip = next(e for e in entries if e["method"] == "kip")
  assert kip["protocol"] == "kip" and "--learn-labels" in kip["distill"]
  assert {e["protocol"] for e in entries if e["method"] == "dm"} == {"dsa"}
  # Each evaluation's extra flags are ones experiments.transfer accepts; its folder names them;
  # the smallest budget alone has a random real subset beside it.
  from evaluation.transfer import JOB as TRANSFER

  for method, extra in compute_curve.EVAL_EXTRA.items():
    cli.parse_config(TRANSFER.config, ["--support", "s.npz", *extra], "")
    assert all(e["eval_dir"].endswith(compute_curve.EVAL_NAMES[method])
               for e in entries if e["method"] == method)
  assert {(e["multiple"], e["baselines"]) for e in entries} == {(1, "random"), (2, "none"),
                                                              (20, "none")}


def test_a_budget_reads_the_record_of_its_own_step():
  records = [{"step": 0, "cpu_time": 0.0}, {"step": 100, "cpu_time": 5.0},
             {"step": 1000, "cpu_time": 40.0}, {"step": 2000, "cpu_time": 90.0}]
  assert compute_curve._at(records, 1000)["cpu_time"] == 40.0
  assert compute_curve._at(records, 1500) is None  # not logged there: not finished
  assert compute_curve._at(records[:2], 1000) is None


def test_the_own_evaluation_is_read_at_the_budgets_step():
  records = [{"step": 0, "test_acc": 0.1}, {"step": 200, "loss": 1.0, "cpu_time": 9.0},
             {"step": 200, "test_acc": 0.8}, {"step": 400, "finite_test_acc": 0.9}]
  assert compute_curve._own(records, 200) == ("test_acc", 0.8)
  assert compute_curve._own(records, 400) == ("finite_test_acc", 0.9)
  assert compute_curve._own(records, 300) == (None, None)


def test_report_only_tabulates_the_finished_budgets_and_starts_nothing(tmp_path, monkeypatch):
  """`--report-only`: a budget whose distillation record, snapshot and evaluation are on disk is
  tabulated (its own and finite accuracies, the random row's); an unfinished one is listed as
  not run, and no command is started."""
  import json

  def refuse(args):
    raise AssertionError(f"started {args}")

  monkeypatch.setattr(compute_curve, "_run", refuse)
  first, _ = compute_curve.plan(["kip"], [1], [1, 2], str(tmp_path), "mnist")
  import os

  os.makedirs(first["workdir"])
  with open(os.path.join(first["workdir"], "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 200, "cpu_time": 30.0, "wall_time": 31.0}) + "\n")
    f.write(json.dumps({"step": 200, "test_acc": 0.87}) + "\n")
  os.makedirs(os.path.dirname(first["snapshot"]))
  open(first["snapshot"], "w").close()
  os.makedirs(first["eval_dir"])
  rows = [{"row": "distilled", "test_acc": [0.85, 0.86], "test_acc_mean": 0.855, "net": "conv",
           "width": 128, "steps": 1000, "lr": 1e-4, "centered": True},
          {"row": "random", "test_acc": [0.4], "test_acc_mean": 0.4, "net": "conv", "width": 128,
           "steps": 1000, "lr": 1e-4}]
  with open(os.path.join(first["eval_dir"], "transfer.json"), "w") as f:
    json.dump({"rows": rows}, f)
  out = tmp_path / "curve.json"
  assert compute_curve.main(["--methods", "kip", "--ipc", "1", "--multiples", "1,2", "--root",
                             str(tmp_path), "--out", str(out), "--report-only"]) == 0
  report = json.loads(out.read_text())
  (row,) = report["rows"]
  assert (row["multiple"], row["own_acc"], row["test_acc_mean"], row["random_acc_mean"],
          row["centered"], row["net"]) == (1, 0.87, 0.855, 0.4, True, "conv-128")
  assert report["not_run"] == ["kip ipc 1 x2"]
