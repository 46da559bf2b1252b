"""Every method's cost beside its official code, from the side-by-side runs' records.

  python -m bench.peer_steps [--records rfad=runs/peers/rfad_speed/result.json ...]

Reads bench/results/peers/<method>_mnist.json (written by bench/peers/<method>/compare.py: both
sides at equal settings, each pinned to its own core with one thread) and prints, per method and
images per class, the CPU seconds per step of the official code and of ours and their ratio
official / ours (above 1: ours is faster). Steady CPU-s per step (the second half of a run, no
compilation or evaluation) where both sides recorded it; otherwise the whole distillation's CPU
seconds over its steps (labelled "run"; never one measure against the other). Seeds are
averaged. `--records METHOD=PATH` reads a method's records from another file (a re-run after a
change). Writes bench/results/peer_steps.json.
This tabulates; it runs nothing: the runs are the compare.py commands in bench/peers/README.md.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np

from bench.peers.common import read_json, write_json
from kip import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, "bench", "results", "peers")
OUT = os.path.join(ROOT, "bench", "results", "peer_steps.json")
# Our side whose settings are our command's defaults now (the others are variants).
OURS = {"datadam": "ours_all", "rfad": "ours_map"}


def per_step(record: dict) -> dict[str, float]:
  """A run record's CPU-s per step, by each measure it allows: `steady` and `run`."""
  out = {}
  if record.get("steady_cpu_s_per_step"):
    out["steady"] = float(record["steady_cpu_s_per_step"])
  steps = record.get("steps") or record.get("iterations")
  if record.get("distill_cpu_s") and steps:
    out["run"] = float(record["distill_cpu_s"]) / steps
  return out


def rows_of(method: str, records: list[dict], settings: dict) -> list[dict]:
  """Official against our default side per ipc, by a measure both sides recorded (steady before
  run), averaged over the seeds that recorded it."""
  ours = OURS.get(method, "ours")
  if not any(r.get("side") == ours for r in records):
    ours = "ours"
  rows = []
  for ipc in sorted({r["ipc"] for r in records if "ipc" in r}):
    runs = {side: [per_step(r | {"steps": r.get("steps") or settings.get("steps")})
                   for r in records if r.get("side") == side and r.get("ipc") == ipc]
            for side in ("official", ours)}
    kinds = [k for k in ("steady", "run")
             if all(any(k in v for v in runs[side]) for side in runs)]
    if not kinds:
      continue
    kind = kinds[0]
    have = {side: [v[kind] for v in runs[side] if kind in v] for side in runs}
    off, mine = (float(np.mean(have[side])) for side in ("official", ours))
    rows.append({"method": method, "ipc": ipc, "ours_side": ours,
                 "official_cpu_s_per_step": off, "ours_cpu_s_per_step": mine, "measured": kind,
                 "seeds": f"{len(have['official'])}/{len(have[ours])}",
                 "official_over_ours": off / mine})
  return rows


def record_files(folder: str) -> dict[str, str]:
  """{method: path} of the comparisons' records in `folder` (`<method>_mnist.json`; a method's
  name may hold underscores: krr_st)."""
  return {os.path.basename(f)[:-len("_mnist.json")]: f
          for f in sorted(glob.glob(os.path.join(folder, "*_mnist.json")))}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--records", nargs="*", default=[], metavar="METHOD=PATH",
                 help="read METHOD's records from PATH instead of bench/results/peers/")
  p.add_argument("--out", default=OUT)
  args = p.parse_args(argv)
  files = record_files(PEERS)
  for item in args.records:
    method, sep, path = item.partition("=")
    if not sep or not os.path.exists(path):
      p.error(f"--records takes METHOD=PATH of an existing file, not {item!r}")
    files[method] = path
  rows = []
  for method, path in sorted(files.items()):
    record = read_json(path)
    rows += rows_of(method, record.get("runs", []), record.get("settings", {}))
  if not rows:
    sys.exit("bench.peer_steps: no records with both sides' times")
  print(cli.format_table(
      ("method", "ipc (KRR-ST: images)", "ours (side)", "official CPU-s/step", "ours CPU-s/step",
       "official/ours", "measured", "seeds"),
      [(r["method"], str(r["ipc"]), r["ours_side"], f"{r['official_cpu_s_per_step']:.3f}",
        f"{r['ours_cpu_s_per_step']:.3f}", f"{r['official_over_ours']:.2f}", r["measured"],
        r["seeds"]) for r in rows]))
  write_json(args.out, {"command": " ".join(["python -m bench.peer_steps",
                                             *(argv or sys.argv[1:])]),
                        "date": time.strftime("%Y-%m-%d"),
                        "sources": {m: os.path.relpath(f, ROOT) for m, f in files.items()},
                        "rows": rows})
  print(f"written {args.out}")


if __name__ == "__main__":
  main()
