"""What the side-by-side comparisons share (bench/peers/<method>/compare.py): running one side's
command pinned to a core with one thread and measuring its CPU time, reading the records, and the
accuracy intervals and paired differences of their tables."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time

import numpy as np

from bench.cpu_peak import ONE_THREAD as XLA_ONE_THREAD
from kip.files import write_json

__all__ = ["REPO", "run_child", "read_json", "write_json", "interval", "interval_n",
           "paired_differences"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One thread everywhere: both sides' timings compare like with like on a pinned core.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "XLA_FLAGS": XLA_ONE_THREAD}


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


def interval(accs) -> str:
  """Accuracies (fractions) as `mean [low, high]` in %, Student's t 95% interval; one value alone,
  `-` for none."""
  from kip.scores import interval95  # noqa: PLC0415

  accs = 100 * np.asarray(accs, np.float64)
  if len(accs) == 0:
    return "-"
  if len(accs) == 1:
    return f"{accs[0]:.2f}"
  iv = interval95(accs)
  return f"{iv.mean:.2f} [{iv.low:.2f}, {iv.high:.2f}]"


def interval_n(accs) -> str:
  """`interval` with the count: `mean [low, high] (n=k)`."""
  return f"{interval(accs)} (n={len(accs)})" if len(accs) else "-"


def paired_differences(records: list[dict], mine: str, other: str, key: str
                       ) -> list[tuple[int, list[str], list[float]]]:
  """Per ipc, (ipc, seeds, differences): side `mine` minus side `other` of each record's `key`
  (accuracies per evaluation network) where both sides have that seed; every set is evaluated by
  the same network seeds, so the difference removes the networks' own spread."""
  out = []
  for ipc in sorted({r["ipc"] for r in records}):
    diffs, seeds = [], []
    for seed in sorted({r["seed"] for r in records}):
      accs = {r["side"]: r.get(key) for r in records if r["ipc"] == ipc and r["seed"] == seed}
      if accs.get(mine) and accs.get(other):
        diffs += list(np.subtract(accs[mine], accs[other]))
        seeds.append(str(seed))
    if diffs:
      out.append((ipc, seeds, diffs))
  return out
