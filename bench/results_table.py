"""Regenerates the committed benchmark table from its archived cells, running nothing.

The table in bench/results/benchmark/ (benchmark.md, .json, .png) and between the markers of
docs/results.md is written by the command recorded in its benchmark.json; this re-runs that
command with --table-only, which reads every cell back from bench/results/benchmark/cells and
trains nothing (seconds). It is the one command here that rewrites tracked files on purpose: the
examples in the docs write under runs/.

  make results        # or: python -m bench.results_table
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from experiments import benchmark

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "bench" / "results" / "benchmark" / "benchmark.json"


def recorded_argv(record: Path = RECORD) -> list[str]:
  """The recorded benchmark command's arguments, as written, with --table-only."""
  words = shlex.split(json.loads(record.read_text())["command"])
  if words[:3] != ["python", "-m", "experiments.benchmark"]:
    raise SystemExit(f"{record}: its command is not a benchmark command: {words[:3]}")
  argv = [w for w in words[3:] if w != "--dry-run"]
  return argv if "--table-only" in argv else [*argv, "--table-only"]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--record", default=str(RECORD), help="the benchmark.json to regenerate")
  args = parser.parse_args(argv)
  recorded = recorded_argv(Path(args.record))
  sys.argv = ["experiments.benchmark", *recorded]  # the table records the command it ran
  os.chdir(ROOT)  # the recorded paths are relative to the repository
  return benchmark.main(recorded) or 0


if __name__ == "__main__":
  raise SystemExit(main())
