"""The first GPU's check: every method at `--preset paper` for a bounded number of steps, one
block of KIP's analytic ConvNet kernel, and one finite-network evaluation at the KIP protocol's
width, each in a fresh process; writes steps/s, peak device memory and the accuracy reached.

  python -m bench.gpu_check                       # on a GPU: under 8 minutes (budget --budget-s)
  python -m bench.gpu_check --toy --methods dm    # on a CPU: toy sizes, seconds per check

Each check is the project's own command (`experiments.<method> --preset paper --steps N ...`) run
by a child process that reports the device's peak memory after it (`memory_stats()`'s
`peak_bytes_in_use` on a GPU; on a CPU, the process's peak resident memory). Steps per second
come from the run's metrics.jsonl (the steps after the first, which compiles, over their update
time); "reached" is the last test or validation accuracy (KRR-ST: MSE) the run recorded, its final
evaluation; "seconds" is a check's wall time (the kernel block: one block after compiling).
What must be bounded to fit the budget is said per check in its `note` (trajectory methods match a
one-expert store started at epoch 0, KRR-ST distils onto a teacher trained for a few steps, the
autoencoder runs one epoch per phase): the step itself is the paper's. A check that fails is
recorded with its error's last line and the others go on; checks not started within the budget
are recorded as skipped. Prints a table and writes bench/results/gpu_check.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("kip", "label_solve", "frepo", "rfad", "krr_st", "dm", "datadam", "mtt", "datm",
           "pad", "autoencoder")
TRAJECTORY = ("mtt", "datm", "pad")
MEMORY_TAG = "GPU_CHECK_MEMORY "
# Toy sizes for a CPU (the tests): the cpu preset, shrunk further where a step is still slow.
TOY = {"kip": ["--target-batch", "100"], "label_solve": ["--target-size", "200"],
       "frepo": ["--width", "8", "--target-batch", "64", "--num-models", "2"],
       "rfad": ["--width", "8", "--target-batch", "64", "--num-models", "1",
                "--eval-models", "1"],
       "krr_st": ["--width", "8", "--target-batch", "64"],
       "dm": ["--real-per-class", "8", "--eval-steps", "5", "--eval-width", "8", "--width", "8"],
       "datadam": ["--real-per-class", "8", "--eval-steps", "5", "--eval-width", "8",
                   "--width", "8"],
       "mtt": ["--syn-steps", "2", "--eval-steps", "5"],
       "datm": ["--syn-steps", "2", "--eval-steps", "5"],
       "pad": ["--syn-steps", "2", "--eval-steps", "5"],
       "krr_st_teacher": ["--width", "8"]}


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "bench.gpu_check", "--child", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _child(argv: list[str]) -> int:
  """Runs `python -m <module> <args>`'s main in this process, then prints the peak memory."""
  import importlib

  module, args = argv[0], argv[1:]
  from kip import cli

  code = 0
  try:
    cli.run_main(lambda _: importlib.import_module(module).main(args))
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
  import jax

  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  print(MEMORY_TAG + json.dumps({
      "peak_bytes": int(stats["peak_bytes_in_use"] if stats else cli.peak_rss_mib() * 2**20),
      "kind": "device peak_bytes_in_use" if stats else "host peak resident memory",
      "device": f"{device.platform} ({device.device_kind})"}), flush=True)
  return code


def _memory(out: str) -> dict:
  lines = [line for line in out.splitlines() if line.startswith(MEMORY_TAG)]
  return json.loads(lines[-1][len(MEMORY_TAG):]) if lines else {}


def _steps_per_s(records: list[dict]) -> float | None:
  records = [r for r in records if "train_time" in r and "step" in r]
  if len(records) < 2:
    return None
  first, last = records[0], records[-1]
  elapsed = last["train_time"] - first["train_time"]
  return (last["step"] - first["step"]) / elapsed if elapsed > 0 else None


def _quality(records: list[dict]) -> dict:
  """The last value of every test or validation accuracy (and, for regression targets, MSE) the
  run recorded."""
  found = {}
  for record in records:
    found.update({k: v for k, v in record.items() if isinstance(v, int | float)
                  and ("acc" in k or "mse" in k) and ("test" in k or "validation" in k)})
  return found


def _last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1][:300] if lines else ""


class Checks:
  """The plan: each check is (name, list of (module, args) commands, the workdir whose metrics
  it reports, note)."""

  def __init__(self, toy: bool, steps: int, dataset: str, scratch: str, data_flags: list[str]):
    self.toy, self.steps, self.dataset, self.scratch = toy, steps, dataset, scratch
    self.data = ["--dataset", dataset, *data_flags]
    self.preset = ["--preset", "cpu" if toy else "paper"]

  def _dir(self, name: str) -> str:
    return os.path.join(self.scratch, name)

  def method(self, name: str) -> tuple[list[tuple[str, list[str]]], str, str]:
    from importlib import import_module

    job = import_module(f"experiments.{name}").JOB
    fields = job.config.__dataclass_fields__
    workdir = self._dir(name)
    args = [*self.data, "--workdir", workdir, "--no-progress"]
    if "preset" in fields:
      args += self.preset
    note = "--preset paper" if "preset" in fields and not self.toy else (
        "the command's defaults" if not self.toy else "toy sizes")
    if "steps" in fields:
      args += ["--steps", str(self.steps)]
    if "eval_every" in fields:
      args += ["--eval-every", "0"]
    commands = []
    if name in TRAJECTORY:
      buffer = self._dir(f"buffer-{name}")
      expert_epochs = 2
      commands.append(("experiments.buffer", [*self.data, *self.preset, "--buffer", buffer,
                                              "--experts", "1", "--epochs",
                                              str(expert_epochs + 1), "--no-progress"]
                       + (["--train-size", "2000", "--width", "8"] if self.toy else [])))
      args += ["--buffer", buffer, "--experts", "1", "--max-start-epoch", "1", "--expert-epochs",
               str(expert_epochs)]
      if "max_start_epoch_final" in fields:
        args += ["--max-start-epoch-final", "1"]
      note += "; a one-expert store, started at epoch 0-1"
    if name == "krr_st":
      teacher = self._dir("teacher")
      commands.append(("experiments.teacher", [*self.data, *self.preset, "--workdir", teacher,
                                               "--epochs", "0.02", "--no-progress"]
                       + (TOY["krr_st_teacher"] if self.toy else [])))
      args += ["--teacher", os.path.join(teacher, "teacher.msgpack")]
      note += "; a teacher of 0.02 epochs"
    if name == "autoencoder":
      args += ["--pretrain-epochs", "1", "--epochs", "1"]
      note += "; one epoch per phase"
    if self.toy:
      args += TOY.get(name, [])
    commands.append((f"experiments.{name}", args))
    return commands, workdir, note

  def finite_net(self, support: str) -> tuple[list[tuple[str, list[str]]], str, str]:
    workdir = self._dir("finite-net")
    args = [*self.data, "--support", support, "--protocol", "kip", "--seeds", "1",
            "--baselines", "none", "--workdir", workdir, "--steps", str(self.steps * 10),
            "--no-progress"]
    args += ["--preset", "cpu", "--width", "16"] if self.toy else ["--preset", "paper"]
    return ([("experiments.transfer", args)], os.path.join(workdir, "distilled"),
            "the kip protocol's network (width 1024 unless --toy), 10x --steps")


def kernel_block(n: int, toy: bool) -> dict:
  """One n x n block of KIP's analytic ConvNet NTK on MNIST-shaped inputs, timed after a warm-up,
  in a child process (peak memory is the block's)."""
  del toy
  out = _run(["bench.gpu_check", "--kernel-block", str(n)], timeout=900)
  result = {"name": "kip convnet kernel block", "ok": out.returncode == 0, **_memory(out.stdout)}
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  if out.returncode == 0 and lines:
    result |= json.loads(lines[-1])
  else:
    result["error"] = _last_line(out.stderr)
  return result


def _kernel_child(n: int) -> int:
  import jax
  import numpy as np

  from kip.kernels import make_kernel

  kernel = make_kernel("convnet", kernel_type="ntk")
  x = np.random.default_rng(0).standard_normal((n, 28, 28, 1)).astype(np.float32)
  fn = jax.jit(lambda a, b: kernel.apply(kernel.init(jax.random.key(0)), a, b))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(x, x))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(fn(x, x))
  print(json.dumps({"block": f"{n} x {n}", "compile_s": round(compile_s, 2),
                    "seconds": round(time.perf_counter() - t0, 3)}), flush=True)
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "--child":
    return _child(argv[1:])
  if argv and argv[0] == "--kernel-block":  # a child's command (see kernel_block)
    return _kernel_child(int(argv[1]))
  parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--methods", default=",".join(METHODS),
                      help="comma-separated methods (default: all)")
  parser.add_argument("--steps", type=int, default=20,
                      help="steps of each method (the finite net trains 10x as many)")
  parser.add_argument("--toy", action="store_true",
                      help="toy sizes for a CPU (the tests): cpu presets, shrunk further")
  parser.add_argument("--dataset", default="mnist")
  parser.add_argument("--budget-s", type=float, default=480,
                      help="start no check after this many seconds (the GPU's 8 minutes)")
  parser.add_argument("--kernel-block", dest="block", type=int, default=0,
                      help="rows of the kernel block (default: 256, toy: 4)")
  parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpu_check.json"))
  parser.add_argument("--keep", default="", help="keep the runs in this folder (default: a "
                                                  "temporary folder, removed)")
  args = parser.parse_args(argv)
  names = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(names) - set(METHODS))
  if unknown or args.steps < 2:
    parser.error(f"unknown methods {unknown}" if unknown else "--steps must be at least 2")
  data_flags = []
  for flag, env in (("--manual-dir", "KIP_MANUAL_DIR"), ("--data-dir", "KIP_DATA_DIR")):
    if os.environ.get(env):
      data_flags += [flag, os.environ[env]]
  scratch = args.keep or tempfile.mkdtemp(prefix="gpu-check-")
  checks = Checks(args.toy, args.steps, args.dataset, scratch, data_flags)
  start, rows = time.perf_counter(), []
  try:
    plan = [(name, *checks.method(name)) for name in names]
    for name, commands, workdir, note in plan:
      rows.append(_check(name, commands, workdir, note, start, args.budget_s))
    kip_set = os.path.join(checks._dir("kip"), "distilled.npz")
    if os.path.exists(kip_set):
      rows.append(_check("finite net", *checks.finite_net(kip_set), start, args.budget_s))
    if time.perf_counter() - start < args.budget_s:
      rows.append(kernel_block(args.block or (4 if args.toy else 256), args.toy))
    else:
      rows.append({"name": "kip convnet kernel block", "ok": False, "skipped": "budget"})
  finally:
    if not args.keep:
      shutil.rmtree(scratch, ignore_errors=True)
  import jax

  from kip import cli
  from kip.files import write_json

  report = {"machine": f"{platform.node()} ({cli.describe_devices()})", "toy": args.toy,
            "steps": args.steps, "wall_s": round(time.perf_counter() - start, 1),
            "jax": jax.__version__, "rows": rows}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  write_json(args.out, report)
  table = [(r["name"], "ok" if r.get("ok") else r.get("skipped") or "FAILED",
            f"{r['steps_per_s']:.3g}" if r.get("steps_per_s") else "-",
            f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else "-",
            ", ".join(f"{k} {100 * v:.2f}%" if "acc" in k else f"{k} {v:.4g}"
                      for k, v in r.get("quality", {}).items()) or "-",
            f"{r.get('seconds', '-')}") for r in rows]
  print(cli.format_table(("check", "status", "steps/s", "peak MiB", "reached", "seconds"),
                         table))
  print(f"{report['machine']}; {report['wall_s']} s in all; written {args.out}")
  for r in rows:
    if r.get("error"):
      print(f"{r['name']}: {r['error']}")
  return 0 if all(r.get("ok") for r in rows) else 1


def _check(name, commands, workdir, note, start, budget_s) -> dict:
  if time.perf_counter() - start >= budget_s:
    return {"name": name, "ok": False, "skipped": "budget", "note": note}
  t0 = time.perf_counter()
  memory, error = {}, ""
  for module, args in commands:
    out = _run([module, *args], timeout=max(60.0, budget_s * 2))
    memory = _memory(out.stdout) or memory
    if out.returncode != 0:
      error = f"{module}: {_last_line(out.stderr)}"
      break
  from kip.loop import read_metrics

  records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return {"name": name, "ok": not error, "note": note, "error": error,
          "seconds": round(time.perf_counter() - t0, 1), "steps_per_s": _steps_per_s(records),
          "quality": _quality(records), **memory,
          "command": " ".join(["python -m", commands[-1][0], *commands[-1][1]])}


if __name__ == "__main__":
  sys.exit(main())
