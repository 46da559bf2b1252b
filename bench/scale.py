"""Scaling of the sharded KIP step and kernel blocks with the number of devices, and the achieved
FLOP/s of the pooled ConvNet kernel against a derived FLOP count.

For each device count (on CPU, simulated with XLA_FLAGS=--xla_force_host_platform_device_count=N
in a subprocess; on GPU/TPU, the first N real devices) and each of the `fc`, `conv` and `convnet`
kernels, measures:
  - KIP steps/s (`methods.kip.make_kip` on `kip.sharding.shard_kernel`, target rows sharded) and
    kernel entries/s ((n_t + n_s) x n_s entries per step);
  - the forward kernel (evaluation's K(test, support) blocks): entries/s;
  - for `convnet`, forward FLOP/s = entries/s x the derived FLOPs per entry, against the
    devices' peak: the floor of a block's time is its FLOPs / peak, and `% peak` is floor / time.

Derived FLOP count of one entry of the infinite-width ConvNet NTK (`convnet_flops_per_entry`):
every layer carries, for a pair of images, the NNGP and NTK covariances between all pairs of
pixel positions, P^2 numbers each for P = H x W positions at that layer.
  - 3x3 conv (SAME, stride 1): each NNGP element is W_std^2/9 times the sum of 9 shifted
    elements plus b_std^2 (8 adds, 1 multiply, 1 add = 10 FLOPs); the NTK element the same plus
    the new NNGP (11 FLOPs): 21 P^2.
  - ReLU (arc-cosine kernels) per element: norm = sqrt(q11 q22) (2), cos t = q12 / norm (1),
    t = arccos (1), sin t = sqrt(1 - cos^2 t) (3), NNGP = norm (sin t + (pi - t) cos t) / (2 pi)
    (6), NTK = NNGP + ntk (pi - t) / (2 pi) (3): 16 P^2, a transcendental counted as one FLOP.
  - 2x2 average pool: each output element sums 16 inputs and scales (16 FLOPs per output, P^2/16
    outputs) for NNGP and NTK: 2 P^2.
  - the readout (mean over the diagonal positions, a Dense) is O(P) and left out; so are the
    per-image variances, computed once per row and column of a block, not per entry.
KIP's ConvNet on 28x28 images: 2 x (conv + ReLU) at 784 positions, then pool, and a conv + ReLU
+ pool at each of 196 and 49 positions: 48.3 MFLOP per entry, 94% of it at full resolution
(82.4 MFLOP on 32x32 images; the table's footer lists the terms). What the code executes is
more: neural-tangents' depthwise convolutions multiply by the 6 zeros of the diagonal filter on
GPU, and the per-image variances add (r + c) / (r c) of the work for r x c tiles. (The JSON's
`xla_flops_per_entry` is XLA's cost analysis of one device's compiled block, which counts a
loop body once: it is exact only when a device computes one tile.)

  python -m bench.scale                      # 1, 2, 4 simulated CPU devices, CPU-sized problems
  python -m bench.scale --size gpu           # the real devices, GPU-sized problems
Prints a table and writes bench/results/scale_<platform>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

# name -> (image side, n_support, n_target, forward rows) per size
SIZES = {
    "cpu": {"fc": (28, 100, 2000, 10000), "conv": (28, 20, 200, 1000),
            "convnet": (28, 6, 6, 8), "convnet32": (32, 6, 6, 8)},
    "gpu": {"fc": (28, 1000, 5000, 10000), "conv": (28, 100, 2000, 10000),
            "convnet": (28, 100, 100, 256), "convnet32": (32, 100, 100, 256)},
}
# FP32 (non-tensor-core) peaks, FLOP/s, of the accelerators we expect; --peak overrides.
PEAKS = {"H100 PCIe": 51.2e12, "H100": 66.9e12, "H200": 66.9e12, "A100": 19.5e12,
         "V100": 15.7e12, "L4": 30.3e12}
MEMORY_BYTES = 2**30  # per-device tile budget: the same tiles on every device count


def convnet_flops_per_entry(height: int, width: int, extra_conv: bool = True) -> dict:
  """FLOPs of one entry of KIP's ConvNet NTK (see the module docstring), by layer."""
  conv, relu, pool = 21, 16, 2
  positions = height * width
  terms = {f"conv+relu at {height}x{width}": (2 if extra_conv else 1) * (conv + relu)
           * positions**2, f"pool {height}x{width}": pool * positions**2}
  h, w = height, width
  for _ in range(2):
    h, w = h // 2, w // 2
    positions = h * w
    terms[f"conv+relu+pool at {h}x{w}"] = (conv + relu + pool) * positions**2
  terms["total"] = sum(terms.values())
  return terms


def cpu_peak() -> float:
  """Cores x clock x 32 FP32 FLOPs per cycle (two 256-bit FMA pipes, AVX2/AVX-512 on Zen 4)."""
  mhz = 0.0
  try:
    with open("/proc/cpuinfo") as f:
      mhz = max(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
  except (OSError, ValueError):
    pass
  return (os.cpu_count() or 1) * mhz * 1e6 * 32


def device_peak(device_kind: str, platform_name: str, override: float | None) -> float | None:
  if override:
    return override
  if platform_name == "cpu":
    return cpu_peak() or None
  for name, peak in PEAKS.items():
    if name in device_kind:
      return peak
  return None


def _block_until(x):
  import jax  # noqa: PLC0415

  return jax.block_until_ready(x)


def child(args) -> dict:
  """Measures everything on the devices this process sees; returns one record."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from kip.kernels import (
    make_kernel,  # noqa: PLC0415
    no_params,  # noqa: PLC0415
  )
  from kip.method import Batch  # noqa: PLC0415
  from kip.sharding import make_mesh, shard_kernel  # noqa: PLC0415
  from methods.kip import make_kip  # noqa: PLC0415

  devices = jax.devices()[:args.devices]
  mesh = make_mesh(devices)
  record = {"devices": len(devices), "platform": devices[0].platform,
            "device_kind": devices[0].device_kind, "kernels": {}}
  rng = np.random.default_rng(0)
  for name in args.kernels:
    side, n_s, n_t, n_rows = SIZES[args.size][name]
    arch = "convnet" if name.startswith("convnet") else name
    kernel = make_kernel(arch)
    image = (side, side, 1)
    x_s = rng.standard_normal((n_s, *image)).astype(np.float32)
    y_s = (np.eye(10)[np.arange(n_s) % 10] - 0.1).astype(np.float32)
    x_t = rng.standard_normal((n_t, *image)).astype(np.float32)
    y_t = (np.eye(10)[rng.integers(0, 10, n_t)] - 0.1).astype(np.float32)
    step_kernel = shard_kernel(kernel.kernel_fn, kernel.covariance, mesh, MEMORY_BYTES,
                               backward=True)
    method = make_kip(no_params(step_kernel), mesh=mesh)
    state = method.init(jax.random.key(0), x_s, y_s)
    key = jax.random.key(1)
    t0 = time.perf_counter()
    state, metrics = method.update(state, Batch(x_t, y_t), key, 0)
    _block_until(metrics["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      state, metrics = method.update(state, Batch(x_t, y_t), key, 0)
      _block_until(metrics["loss"])
      times.append(time.perf_counter() - t0)
    step_s = min(times)
    layout = step_kernel.layout(n_t, n_s, image)
    row = {"image": side, "n_support": n_s, "n_target": n_t, "step_s": step_s,
           "steps_per_s": 1 / step_s, "step_entries_per_s": (n_t + n_s) * n_s / step_s,
           "first_step_s": compile_s, "tiles": list(layout.tiles), "remat": layout.remat}

    forward = shard_kernel(kernel.kernel_fn, kernel.covariance, mesh, MEMORY_BYTES)
    fn = jax.jit(forward)
    x_rows = jnp.asarray(rng.standard_normal((n_rows, *image)), jnp.float32)
    x_cols = jnp.asarray(x_s)
    with jax.default_matmul_precision("highest"):
      _block_until(fn(x_rows, x_cols))
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        _block_until(fn(x_rows, x_cols))
        times.append(time.perf_counter() - t0)
      compiled = fn.lower(x_rows, x_cols).compile()
    block_s = min(times)
    entries = n_rows * n_s
    row.update({"forward_rows": n_rows, "forward_s": block_s,
                "forward_entries_per_s": entries / block_s})
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and cost.get("flops"):
      row["xla_flops_per_entry"] = float(cost["flops"]) / entries
    if arch == "convnet":
      flops = convnet_flops_per_entry(side, side)["total"]
      row["derived_flops_per_entry"] = flops
      row["forward_flops_per_s"] = flops * entries / block_s
    record["kernels"][name] = row
  return record


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=tuple(SIZES), default=None,
                      help="problem sizes (default: cpu on CPU, gpu otherwise)")
  parser.add_argument("--devices", type=str, default="",
                      help="comma-separated device counts (default: 1,2,4 simulated on CPU; "
                           "1, 2, 4, ... up to the real device count elsewhere)")
  parser.add_argument("--kernels", type=str, default="fc,conv,convnet,convnet32")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--peak", type=float, default=0.0,
                      help="one device's peak FP32 FLOP/s (default: from the device kind)")
  parser.add_argument("--out", default="")
  parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.kernels = args.kernels.split(",")

  if args.child:
    args.devices = args.child
    print("RESULT " + json.dumps(child(args)), flush=True)
    return

  import jax  # noqa: PLC0415

  platform_name = jax.default_backend()
  args.size = args.size or ("cpu" if platform_name == "cpu" else "gpu")
  if args.devices:
    counts = [int(n) for n in args.devices.split(",")]
  elif platform_name == "cpu":
    counts = [1, 2, 4]
  else:
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= jax.device_count()]
  records = []
  for n in counts:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if platform_name == "cpu":
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                          + f" --xla_force_host_platform_device_count={n}").strip()
    command = [sys.executable, "-m", "bench.scale", "--child", str(n), "--size", args.size,
               "--kernels", ",".join(args.kernels), "--repeats", str(args.repeats)]
    print(f"measuring on {n} device(s) ...", file=sys.stderr, flush=True)
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
      sys.exit(f"the {n}-device run failed:\n{out.stderr[-3000:]}")
    records.append(json.loads(lines[-1][len("RESULT "):]))

  kind = records[0]["device_kind"]
  peak = device_peak(kind, platform_name, args.peak)
  header = (f"{'kernel':<10} {'image':>5} {'n_s':>5} {'n_t':>5} {'dev':>4} {'steps/s':>9} "
            f"{'entries/s':>10} {'speed-up':>8} {'fwd entries/s':>13} {'fwd GFLOP/s':>11} "
            f"{'% peak':>7}")
  print(f"\n{platform.node()}: {records[0]['devices']}+ x {records[0]['platform']} ({kind}); "
        f"peak {peak / 1e9 if peak else float('nan'):.0f} GFLOP/s per "
        f"{'machine (simulated devices share it)' if platform_name == 'cpu' else 'device'}")
  print(header)
  print("-" * len(header))
  for name in args.kernels:
    base = records[0]["kernels"][name]["steps_per_s"]
    for record in records:
      row = record["kernels"][name]
      flops = row.get("forward_flops_per_s")
      total_peak = (peak if platform_name == "cpu" else (peak or 0) * record["devices"]) or None
      row["fraction_of_peak"] = flops / total_peak if flops and total_peak else None
      print(f"{name:<10} {row['image']:>5} {row['n_support']:>5} {row['n_target']:>5} "
            f"{record['devices']:>4} {row['steps_per_s']:>9.3g} "
            f"{row['step_entries_per_s']:>10.3g} {row['steps_per_s'] / base:>7.2f}x "
            f"{row['forward_entries_per_s']:>13.3g} "
            f"{flops / 1e9 if flops else float('nan'):>11.3g} "
            f"{100 * row['fraction_of_peak'] if row['fraction_of_peak'] else float('nan'):>6.2f}%")
  for side in sorted({SIZES[args.size][n][0] for n in args.kernels if n.startswith("convnet")}):
    terms = convnet_flops_per_entry(side, side)
    print(f"\nderived FLOPs per ConvNet NTK entry at {side}x{side}: "
          + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in terms.items()))

  from kip.io import write_json  # noqa: PLC0415

  out = args.out or os.path.join("bench", "results", f"scale_{platform_name}.json")
  write_json(out, {"command": " ".join(["python -m bench.scale", *(argv or sys.argv[1:])]),
                   "machine": platform.node(), "processor": platform.processor(),
                   "cpu_count": os.cpu_count(), "platform": platform_name, "device_kind": kind,
                   "peak_flops_per_s": peak, "memory_bytes_per_device": MEMORY_BYTES,
                   "sizes": SIZES[args.size], "results": records,
                   "convnet_flops_per_entry": {
                       side: convnet_flops_per_entry(side, side) for side in (28, 32)}})
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
