"""CPU paths that cost our steps 1.5-2.5x, measured before and after their fixes.

  python -m bench.cpu_paths [--rounds 15] [--core 0]

Every case runs in its own process pinned to one core (`taskset`, XLA single-threaded), the
variants of a case alternating call by call; CPU-ms per call (median) and minor page faults per
call. Prints a table and writes bench/results/cpu_paths.json.

- `malloc`: a jitted 3x3 convolution, 1 -> 32 channels, of 640 MNIST images (a 64 MB output):
  glibc's defaults (`KIP_MALLOC=system`) against the freed memory kept (`kip._malloc`, what
  importing `kip` sets). Over 32 MB every call faults in fresh pages.
- `rfad_step`: RFAD's update at the CPU preset (2 random ConvNets of width 32, 256 real images),
  the nets `vmap`ped (grouped convolutions; before) against `auto` (the support's nets unrolled,
  the real batch's in a `lax.map`).
- `dm_step`, `mtt_step`: DM's update at the CPU preset (width 32, 64 real images per class, 10
  per class) and MTT's (width 32, 10 student steps on 100 images): glibc's defaults against the
  freed memory kept (MTT: and its student rematerialised, as before, against not on the CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from bench.cpu_peak import ONE_THREAD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results", "cpu_paths.json")
CASES = ("malloc", "rfad_step", "dm_step", "mtt_step")


def alternate(fns: dict, rounds: int) -> dict:
  """{name: (CPU-ms median, page faults per call)}: each fn called twice untimed, then
  `rounds` times, the fns taking turns."""
  import jax  # noqa: PLC0415

  for _ in range(2):  # compile, then a call that may still grow the heap
    for fn in fns.values():
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  faults = dict.fromkeys(fns, 0)
  for _ in range(rounds):
    for name, fn in fns.items():
      f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
      jax.block_until_ready(fn())
      times[name].append(time.process_time() - t0)
      faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
  return {name: (1000 * statistics.median(t), faults[name] / rounds) for name, t in times.items()}


def _images(n, side, channels, seed=0):
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, side, side, channels)),
                     jnp.float32)


def case_malloc(rounds: int) -> list[dict]:
  """One process's conv timing (the parent runs it with and without KIP_MALLOC=system)."""
  import jax  # noqa: PLC0415
  from jax import lax  # noqa: PLC0415

  x, w = _images(640, 28, 1), _images(3, 3, 32)[:, :, :1]
  conv = jax.jit(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  return _per_process("malloc", "640x28x28x1 -> 32, SAME", functools.partial(conv, x, w), rounds)


def _batch(n, classes, seed):
  import numpy as np  # noqa: PLC0415

  from kip.method import Batch  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, 28, 28, 1)).astype(np.float32)
  return Batch(x, np.eye(classes, dtype=np.float32)[np.arange(n) % classes])


def _stepper(method, support, batch):
  import jax  # noqa: PLC0415

  state = [method.init(jax.random.key(0), support.x, support.y)]

  def call():
    state[0], metrics = method.update(state[0], batch, jax.random.key(1), 1)
    return metrics
  return call


def case_rfad_step(rounds: int) -> list[dict]:
  from methods import rfad  # noqa: PLC0415

  rows = []
  for ipc in (1, 10):
    support, batch = _batch(10 * ipc, 10, 0), _batch(256, 10, 1)
    fns = {}
    for label, over in (("before", "vmap"), ("after", "auto")):
      original = rfad.random_features

      def features(*args, over=over, original=original, **kwargs):
        return original(*args, **kwargs, over_models=over)
      rfad.random_features = features
      try:
        method = rfad.make_rfad(num_classes=10, image_shape=(28, 28, 1), width=32, num_models=2,
                                target_batch=256, target_chunk=0)
      finally:
        rfad.random_features = original
      fns[label] = _stepper(method, support, batch)
    r = alternate(fns, rounds)
    rows.append({"case": "rfad_step", "setting": f"cpu preset, ipc {ipc}",
                 "before_ms": r["before"][0], "after_ms": r["after"][0]})
  return rows


def case_dm_step(rounds: int) -> list[dict]:
  """One process per setting (the malloc setting is per process): the parent compares them."""
  from methods.dm import make_dm  # noqa: PLC0415

  method = make_dm(num_classes=10, image_shape=(28, 28, 1), width=32, real_per_class=64)
  return _per_process("dm_step", "cpu preset, ipc 10",
                      _stepper(method, _batch(100, 10, 0), _batch(640, 10, 1)), rounds)


def case_mtt_step(rounds: int) -> list[dict]:
  """MTT's update at the CPU preset (ConvNet-3 width 32, instance norm, 10 student steps with DSA,
  100 images: 10 per class) on a one-expert store; one process per malloc setting."""
  import tempfile  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.flatten_util import ravel_pytree  # noqa: PLC0415

  from kip import _malloc  # noqa: PLC0415
  from kip.augment import DSA_STRATEGY  # noqa: PLC0415
  from kip.nets import make_net  # noqa: PLC0415
  from methods.trajectory import ExpertStore, make_trajectory_matching  # noqa: PLC0415

  model = make_net("convnet3", 10, width=32, norm="instance", image_shape=(28, 28, 1),
                   dc_padding=True)
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)["params"]
  flat = np.asarray(ravel_pytree(params)[0])
  with tempfile.TemporaryDirectory() as folder:
    store = ExpertStore.create(folder, {"bench": True}, int(flat.size), 1)
    store.add(0, np.stack([flat, flat + 0.01 * np.random.default_rng(1).normal(size=flat.shape)]),
              {})
    before = not _malloc.KEPT  # before: also the rematerialised student of before
    method = make_trajectory_matching(model, params, store, image_shape=(28, 28, 1),
                                      syn_steps=10, expert_epochs=1, max_start_epoch=1,
                                      augment=DSA_STRATEGY, remat=True if before else None)
    support = _batch(100, 10, 0)
    state = [method.init(None, support.x, support.y)]

    def call():
      state[0], metrics = method.update(state[0], None, jax.random.key(1), jnp.asarray(1))
      return metrics
    return _per_process("mtt_step", "cpu preset, ipc 10", call, rounds)


def _per_process(case: str, shape: str, call, rounds: int) -> list[dict]:
  from kip import _malloc  # noqa: PLC0415

  ms, faults = alternate({"step": call}, rounds)["step"]
  return [{"case": case, "setting": "after" if _malloc.KEPT else "before", "shape": shape,
           "ms": ms, "faults_per_call": faults}]


def child(case: str, core: str, rounds: int, system_malloc: bool) -> list[dict]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {ONE_THREAD}".strip()
  if system_malloc:
    env["KIP_MALLOC"] = "system"
  # kip first: its malloc setting must precede the first allocations of XLA's threads.
  code = (f"import json, kip; from bench.cpu_paths import case_{case}; "
          f"print(json.dumps(case_{case}({rounds})))")
  done = subprocess.run(["taskset", "-c", core, sys.executable, "-c", code], cwd=ROOT, env=env,
                        capture_output=True, text=True)
  if done.returncode:
    sys.exit(f"bench.cpu_paths: case {case} failed:\n{done.stderr[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def paired(rows: list[dict], case: str) -> list[dict]:
  """The rows of `_per_process` (one process per setting) as before / after rows."""
  before = [r for r in rows if r["setting"] == "before"]
  after = [r for r in rows if r["setting"] == "after"]
  out = []
  for b, a in zip(before, after, strict=True):
    out.append({"case": case, "setting": a["shape"], "before_ms": b["ms"], "after_ms": a["ms"],
                "before_faults": b["faults_per_call"], "after_faults": a["faults_per_call"]})
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--cases", default=",".join(CASES), help="which cases, comma-separated")
  p.add_argument("--rounds", type=int, default=15, help="timed calls of each variant")
  p.add_argument("--core", default="0", help="the core every process is pinned to")
  p.add_argument("--out", default=OUT)
  args = p.parse_args(argv)
  cases = args.cases.split(",")
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
  rows = []
  for case in cases:
    if case != "rfad_step":  # a process per malloc setting, twice, taking turns
      runs = []
      for _ in range(2):
        for system in (True, False):
          runs += child(case, args.core, args.rounds, system)
      rows += paired(runs, case)
    else:
      rows += child(case, args.core, args.rounds, False)
  print(f"{'case':11s} {'setting':38s} {'before ms':>10s} {'after ms':>9s} {'speed-up':>8s}")
  for r in rows:
    r["speedup"] = r["before_ms"] / r["after_ms"]
    what = r["setting"] + (f" ({r['shape']})" if "shape" in r else "")
    print(f"{r['case']:11s} {what[:38]:38s} {r['before_ms']:10.1f} {r['after_ms']:9.1f} "
          f"{r['speedup']:7.2f}x" + (f"  faults/call {r['before_faults']:.0f} -> "
                                     f"{r['after_faults']:.0f}" if "before_faults" in r else ""))
  import jax  # noqa: PLC0415

  result = {"command": " ".join(["python -m bench.cpu_paths", *(argv or sys.argv[1:])]),
            "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, JAX {jax.__version__}"
                       f", one core (taskset -c {args.core}), XLA single-threaded",
            "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "rows": rows}
  from kip.files import write_json  # noqa: PLC0415

  write_json(args.out, result)
  print(f"written {args.out}")


if __name__ == "__main__":
  main()
