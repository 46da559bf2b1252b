"""What the side-by-side comparisons share (bench/peers/<method>/compare.py): running one side's
command pinned to a core with one thread and measuring its CPU time, and reading the records."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time

from kip.files import write_json

__all__ = ["REPO", "run_child", "read_json", "write_json"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One thread everywhere: both sides' timings compare like with like on a pinned core.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}


def run_child(cmd: list[str], log_path: str, core: str, env: dict | None = None
              ) -> tuple[float, float, int]:
  """Runs `cmd` from the repository (pinned to `core` with one thread when `core` is given;
  `env` added to the environment), output appended to `log_path`; returns (CPU-s of the child
  and its threads, wall-s, exit code)."""
  env = dict(os.environ) | (env or {})
  if core:
    cmd = ["taskset", "-c", core, *cmd]
    env |= ONE_THREAD
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  wall0 = time.perf_counter()
  with open(log_path, "a") as log:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return cpu, time.perf_counter() - wall0, rc


def read_json(path: str):
  with open(path) as f:
    return json.load(f)
