"""bench.gpu_check, the script the first GPU runs: every check's command line is one its command
accepts (at the paper's sizes and at toy sizes), and the toy run works end to end on a CPU."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from bench import gpu_check
from kip import cli


@pytest.mark.parametrize("toy", [False, True])
def test_every_check_is_a_command_line_its_command_accepts(toy, tmp_path):
  import importlib

  checks = gpu_check.Checks(toy, 20, "mnist", str(tmp_path), [])
  planned = [checks.method(name) for name in gpu_check.METHODS]
  planned.append(checks.finite_net(str(tmp_path / "kip" / "distilled.npz")))
  for commands, _, note in planned:
    assert note
    for module, args in commands:
      job = importlib.import_module(module).JOB
      config = cli.parse_config(job.config, args, "", positional=job.positional,
                                presets=job.presets)
      if "steps" in job.config.__dataclass_fields__ and module != "experiments.buffer":
        assert config.steps in (20, 200)
      if not toy and "preset" in job.config.__dataclass_fields__:
        assert config.preset == "paper", module


def test_the_toy_check_runs_on_a_cpu(tmp_path, manual_dir, data_dir):
  out = subprocess.run(
      [sys.executable, "-m", "bench.gpu_check", "--toy", "--steps", "2", "--methods", "kip,dm",
       "--out", str(tmp_path / "gpu.json")], cwd=ROOT, capture_output=True, text=True,
      timeout=900, env={**os.environ, "KIP_MANUAL_DIR": manual_dir, "KIP_DATA_DIR": data_dir})
  assert out.returncode == 0, out.stdout + out.stderr
  report = json.loads((tmp_path / "gpu.json").read_text())
  rows = {r["name"]: r for r in report["rows"]}
  assert list(rows) == ["kip", "dm", "finite net", "kip convnet kernel block"]
  for name in ("kip", "dm", "finite net"):
    assert rows[name]["ok"] and rows[name]["steps_per_s"] > 0 and rows[name]["peak_bytes"] > 0
    assert all(0 <= v <= 1 for v in rows[name]["quality"].values()) and rows[name]["quality"]
  assert rows["kip"]["quality"]["test_acc"] > 0.5  # 2 KIP steps on 10 real images: ~80%
  assert rows["kip convnet kernel block"]["block"] == "4 x 4"
