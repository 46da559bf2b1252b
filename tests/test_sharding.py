"""Kernel blocks across devices: tiles and layouts, the memory model against XLA's own buffer
sizes, sharded kernels and their hand-written gradients against plain autodiff, and the same
numbers on one simulated device and on two processes of two devices each (subprocesses) for KIP,
Label Solve and evaluation."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, xla_flags_with_devices

from kip.kernels import make_kernel
from kip.sharding import (
  entry_bytes,
  make_mesh,
  plan_layout,
  plan_tiles,
  rows_per_call,
  shard_kernel,
)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_plan_tiles_fits_the_budget_and_prefers_fewer_tiles():
  per_entry = entry_bytes("full", (8, 8, 1), backward=True)
  # Everything fits: one tile.
  assert plan_tiles("full", (8, 8, 1), 13, 10, 1000 * per_entry, backward=True) == (13, 10)
  for budget_entries in (3, 20, 50, 130):
    rows, cols = plan_tiles("full", (8, 8, 1), 13, 10, budget_entries * per_entry,
                            backward=True)
    assert rows * cols + rows + cols <= max(budget_entries, 3)
    # No other tile that fits does less work (entries plus diagonals, padding included).
    work = -(-13 // rows) * -(-10 // cols) * (rows * cols + rows + cols)
    for r in range(1, 14):
      for c in range(1, 11):
        if r * c + r + c <= budget_entries:
          assert work <= -(-13 // r) * -(-10 // c) * (r * c + r + c)


def test_layout_tiles_do_not_depend_on_the_device_count():
  per_entry = entry_bytes("full", (8, 8, 1), backward=True)
  layouts = [plan_layout("full", (8, 8, 1), 1000, 10, 20 * per_entry, n, backward=True)
             for n in (1, 2, 3, 4, 8)]
  assert len({layout.tiles for layout in layouts}) == 1
  assert len({layout.group for layout in layouts}) == 1
  for n, layout in zip((1, 2, 3, 4, 8), layouts, strict=True):
    assert layout.remat
    assert layout.rows_per_device * n >= 1000
    assert layout.rows_per_device % (layout.tiles.rows * layout.group) == 0
    # At most one group of padding per device.
    assert layout.rows_per_device * n - 1000 < n * layout.tiles.rows * layout.group
  # Everything fits: one tile per device, an even share, nothing recomputed.
  whole = plan_layout("none", (8, 8, 1), 13, 10, 2**30, 4, backward=True)
  assert (whole.tiles, whole.rows_per_device, whole.remat) == ((4, 10), 4, False)


def test_streaming_calls_hold_a_few_tiles_unless_one_tile_holds_everything():
  per_entry = entry_bytes("none", (2, 2, 1), backward=False)
  small = shard_kernel(make_kernel("fc").kernel_fn, "none", make_mesh(), 40 * per_entry)
  layout = small.layout(100, 3, (2, 2, 1))
  assert layout.tiles.cols == 3 and layout.tiles.rows < 100  # full-width tiles, several of them
  assert rows_per_call(small, 100, 3, (2, 2, 1)) == 8 * layout.tiles.rows
  roomy = shard_kernel(make_kernel("fc").kernel_fn, "none", make_mesh(), 2**30)
  assert rows_per_call(roomy, 100, 3, (2, 2, 1)) == 100


@pytest.mark.parametrize("arch,side,tiles,implementation", [
    ("fc", 8, [(40, 10), (10, 40)], "offsets"),
    ("conv", 8, [(20, 10)], "offsets"),
    ("convnet", 8, [(2, 3)], "offsets"),
    ("convnet", 16, [(2, 2)], "offsets"),
    ("convnet", 8, [(2, 3)], "neural-tangents"),
    ("convnet", 16, [(2, 2)], "neural-tangents"),
])
def test_memory_model_bounds_xla_buffer_sizes(arch, side, tiles, implementation):
  """The per-entry model (what sizes tiles) against XLA's own temp-buffer sizes for the compiled
  forward and forward+backward passes of one tile: an upper bound, and for pooled kernels (the
  ones the budget exists for; ours on offsets and neural-tangents') within 4x of it."""
  kernel = make_kernel(arch, implementation=implementation)
  image = (side, side, 1)
  for rows, cols in tiles:
    x1, x2 = jnp.zeros((rows, *image)), jnp.zeros((cols, *image))
    units = rows * cols + rows + cols
    forward = jax.jit(kernel.kernel_fn).lower(x1, x2).compile().memory_analysis()
    backward = jax.jit(jax.grad(lambda b, a=x1: jnp.sum(kernel.kernel_fn(a, b)))).lower(
        x2).compile().memory_analysis()
    for analysis, is_backward in ((forward, False), (backward, True)):
      model = units * entry_bytes(kernel.covariance, image, is_backward)
      assert analysis.temp_size_in_bytes <= model
      if kernel.covariance in ("full", "offsets"):
        assert analysis.temp_size_in_bytes >= model / 4


def gradient_errors(arch: str, memory) -> tuple[bool, float, float, list[float]]:
  """(whether the kernel is tiled, relative error of K, of a smooth function of K, and of its
  gradients in both arguments) of the sharded kernel on every device against neural-tangents'
  kernel differentiated by JAX."""
  kernel = make_kernel(arch)
  sharded = shard_kernel(kernel.kernel_fn, kernel.covariance, make_mesh(), memory,
                         backward=True)
  rng = np.random.default_rng(0)
  x1 = jnp.asarray(rng.standard_normal((7, 8, 8, 1)), jnp.float32)
  x2 = jnp.asarray(rng.standard_normal((5, 8, 8, 1)), jnp.float32)
  weights = jnp.asarray(rng.standard_normal((7, 5)), jnp.float32)

  def objective(kernel_fn):
    return lambda a, b: jnp.sum(weights * jnp.sin(kernel_fn(a, b) / 3))

  with jax.default_matmul_precision("highest"):
    ours = jax.jit(jax.value_and_grad(objective(sharded), argnums=(0, 1)))(x1, x2)
    plain = jax.jit(jax.value_and_grad(objective(kernel.kernel_fn), argnums=(0, 1)))(x1, x2)
    k_error = rel(jax.jit(sharded)(x1, x2), jax.jit(kernel.kernel_fn)(x1, x2))
  return (sharded.layout(7, 5, (8, 8, 1)).remat, k_error, rel(ours[0], plain[0]),
          [rel(g, e) for g, e in zip(ours[1], plain[1], strict=True)])


def check_gradient_errors(remat, k_error, value_error, grad_errors) -> None:
  assert k_error < 1e-6 and value_error < 1e-6
  assert max(grad_errors) < 1e-5


def test_one_tile_per_device_kernel_and_its_gradients_match_plain_autodiff():
  """The one-tile path (fc: each device's rows whole, the second argument's gradient from the
  transposed kernel) on two simulated devices, in a subprocess; on one device this path is
  plain autodiff itself."""
  code = ("import sys; sys.path.insert(0, 'tests'); import json, test_sharding as t; "
          "print(json.dumps(t.gradient_errors('fc', None)))")
  process = subprocess.run([sys.executable, "-c", code], env=worker_env(2), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
  assert process.returncode == 0, process.stderr[-3000:]
  remat, *errors = json.loads(process.stdout.strip().splitlines()[-1])
  assert not remat
  check_gradient_errors(remat, *errors)


@pytest.mark.slow
def test_tiled_kernel_and_its_gradients_match_plain_autodiff():
  """The tiled path (convnet3: full covariances, several tiles, each recomputed in the backward
  pass) on one device."""
  remat, *errors = gradient_errors("convnet3", 3e6)
  assert remat
  check_gradient_errors(remat, *errors)


def worker_env(devices: int, **extra) -> dict:
  return dict(os.environ, XLA_FLAGS=xla_flags_with_devices(devices),
              JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
              PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra)


WORKER = [sys.executable, str(ROOT / "tests" / "sharding_worker.py")]


def run_worker(devices: int, out: pathlib.Path) -> dict:
  process = subprocess.run([*WORKER, str(out)], env=worker_env(devices), capture_output=True,
                           text=True, timeout=600)
  assert process.returncode == 0, process.stderr[-3000:]
  return dict(np.load(out))


def assert_same_numbers(results: dict, reference: dict) -> None:
  for key, value in reference.items():
    if key not in ("devices", "processes"):
      assert rel(results[key], value) < 1e-5, key


@pytest.mark.slow
def test_same_numbers_on_one_device_and_on_two_processes_of_two_devices(tmp_path):
  """KIP (three steps: losses, images, labels and Adam's moments, which carry the gradients),
  Label Solve and KRR evaluation give the same numbers on one device and on two processes with
  two CPU devices each, joined by `jax.distributed.initialize` (gloo collectives) into one
  4-device mesh: a target batch (13) and target sets (37, 29) that 4 does not divide, fc kernels
  (one tile per device) and a conv kernel (several tiles per device, recomputed). Each process
  drives two of the mesh's devices, so several devices in one process are covered too."""
  one_device = run_worker(1, tmp_path / "1.npz")
  assert int(one_device["devices"]) == 1
  assert bool(one_device["conv/remat"]) and not bool(one_device["fc/remat"])
  for arch in ("fc", "conv"):
    losses = one_device[f"{arch}/losses"]
    assert losses[-1] < losses[0]  # the steps did something
    assert not np.allclose(one_device[f"{arch}/label_solve"], 0)

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = tmp_path / "two_processes.npz"
  processes = [subprocess.Popen(
      [*WORKER, str(out), "--distributed"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=worker_env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
      for i in range(2)]
  for p in processes:
    _, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
  results = dict(np.load(out))
  assert (int(results["processes"]), int(results["devices"])) == (2, 4)
  assert_same_numbers(results, one_device)
