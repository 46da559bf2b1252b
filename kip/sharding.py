"""Kernel blocks across devices and hosts, bounded in memory.

A kernel matrix K(x_rows, x_cols) is computed with its rows sharded over a 1-D mesh of every
device of every process (`make_mesh`); `x_cols` (the support set) is replicated. On each device
the local rows are computed in tiles of `Tiles.rows x Tiles.cols` entries, one after another
(`lax.map`), sized so that one tile's intermediates fit in a per-device memory budget; when a
differentiated kernel needs more than one tile, each tile is rematerialised in the backward pass,
so the memory of the whole step is that of one tile.

`shard_kernel(kernel_fn, covariance, mesh, memory_bytes, backward=...)` wraps a kernel_fn into a
function with the same signature that does all of this inside `jit`: KIP's loss, Label Solve and
evaluation call it like any kernel_fn, and the single-device path is the same code on a mesh of
one. Rows are padded (with copies of the first row) to a whole number of tiles per device and the
padding is sliced off before anything else sees it. Tile shapes do not depend on the device
count, and the backward pass sums gradients in an order that does not either (see
`shard_kernel`), so the numbers are the same on any number of devices. `stream_rows` computes a
kernel against host data a block of rows at a time and hands each block to the host, for kernels
(test x support, train x support) too large to keep.

Several hosts: call `initialize_distributed()` (`jax.distributed.initialize`) first; the mesh
then spans every process's devices and every process runs the same program on the same data.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["AXIS", "Tiles", "Layout", "make_mesh", "initialize_distributed", "is_main_process",
           "default_memory_bytes", "entry_bytes", "plan_tiles", "plan_layout", "tiled_kernel",
           "shard_kernel", "rows_per_call", "stream_rows", "replicate", "with_params",
           "shard_features", "shard_feature_kernel"]

AXIS = "devices"

# Bytes of intermediates per kernel entry, in units of the floats one entry keeps per layer
# (1 without spatial structure, pixels with per-pixel variances, pixels^2 with full spatial
# covariances), for the forward pass and for forward + backward. Upper bounds of XLA's own
# temp-buffer sizes on CPU (`compiled.memory_analysis()`; tested in tests/test_sharding.py).
_FLOATS_PER_UNIT = {"forward": 12, "backward": 24}
# The same for kip.convnet_kernel's entries (a unit: a pixel's 225 offsets), measured 2.0-4.3 and
# 6.1-14.3 at 8, 16 and 28 pixels (one row of entries at a time, so larger tiles use less).
_OFFSET_FLOATS = {"forward": 5, "backward": 16}


class Tiles(NamedTuple):
  """How one device computes its share of K(x1, x2): `rows x cols` entries at a time."""

  rows: int
  cols: int


class Layout(NamedTuple):
  """Where every row goes: `rows_per_device` rows (padded) on each device, computed in `tiles`;
  `remat`: the backward pass recomputes each tile (more than one tile per device), summing the
  support-side gradients of `group` consecutive row tiles at a time, in a fixed order."""

  tiles: Tiles
  rows_per_device: int
  cols: int
  group: int
  remat: bool


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named `AXIS` over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` with the coordinator from the environment.

  JAX reads SLURM's variables (and those of Open MPI and Cloud TPU) by itself; elsewhere set
  `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.
  """
  kwargs = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
      if os.environ.get(env):
        kwargs[key] = int(os.environ[env])
  jax.distributed.initialize(**kwargs)


def is_main_process() -> bool:
  """Whether this is process 0, the one that writes files and logs."""
  return jax.process_index() == 0


def default_memory_bytes(fraction: float = 0.5) -> int:
  """A per-device budget for kernel tiles: `fraction` of the smallest local device's memory
  (accelerators), or of the available host memory shared by the local devices (CPU)."""
  limits = []
  for device in jax.local_devices():
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
      limits.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  if limits:
    return int(fraction * min(limits))
  return int(fraction * _available_host_bytes() / jax.local_device_count())


def _available_host_bytes() -> int:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 8 * 2**30  # no /proc (macOS): assume a laptop's 8 GiB


def entry_bytes(covariance: str, image_shape: tuple[int, ...], backward: bool,
                itemsize: int = 4) -> int:
  """Estimated bytes of intermediates per kernel entry (see `_FLOATS_PER_UNIT`).

  covariance: what the kernel keeps per entry: `none` (fc), `diagonal` (per-pixel variances:
  conv without pooling), `full` (full spatial covariances: pooled ConvNets in neural-tangents)
  or `offsets` (kip.convnet_kernel's pixel offsets).
  itemsize: bytes per number (4 for float32, 8 for float64).
  """
  pixels = math.prod(image_shape[:-1]) if len(image_shape) > 1 else 1
  if covariance == "offsets":  # kip.convnet_kernel: 15 x 15 offsets a pixel (three pools)
    return int(itemsize * pixels * 225 * _OFFSET_FLOATS["backward" if backward else "forward"])
  unit = {"none": 1, "diagonal": pixels, "full": pixels**2}[covariance]
  return int(itemsize * unit * _FLOATS_PER_UNIT["backward" if backward else "forward"])


def plan_tiles(covariance: str, image_shape: tuple[int, ...], n_rows: int, n_cols: int,
               memory_bytes: float, *, backward: bool, itemsize: int = 4) -> Tiles:
  """The tile shape for `n_rows x n_cols` entries within `memory_bytes`.

  A tile of r x c entries also propagates the r + c per-image (diagonal) covariances, so its
  cost and memory grow as r*c + r + c: among tiles that fit, the one with the least total work
  (padding included) wins: one tile of everything when it fits, otherwise full-width or
  square-ish tiles.
  """
  per_unit = entry_bytes(covariance, image_shape, backward, itemsize)
  budget = max(3, int(memory_bytes // per_unit))
  best = None
  for col_tiles in range(1, n_cols + 1):
    cols = _cdiv(n_cols, col_tiles)
    if col_tiles > 1 and cols == _cdiv(n_cols, col_tiles - 1):
      continue  # the same tile width as one fewer column tile
    rows = min(n_rows, (budget - cols) // (cols + 1))
    if rows < 1:
      continue
    cost = _cdiv(n_rows, rows) * col_tiles * (rows * cols + rows + cols)
    if best is None or cost < best[0]:
      best = (cost, rows, cols)
  return Tiles(1, 1) if best is None else Tiles(best[1], best[2])


_MAX_GROUPS = 64  # support-side gradient partials kept at once in the backward pass


def plan_layout(covariance: str, image_shape: tuple[int, ...], n_rows: int, n_cols: int,
                memory_bytes: float, n_devices: int, *, backward: bool,
                itemsize: int = 4) -> Layout:
  """Tiles and padding for `n_rows x n_cols` entries on `n_devices` devices.

  Tiles are planned from all rows, not from one device's share, so every entry is computed in
  the same tile shape whatever the device count (another shape can round differently, and the
  ridge solve amplifies it); with the fixed-order gradient sums of `shard_kernel`, results are
  then identical on any number of devices. When everything fits in one tile, each device takes
  its share as one tile instead (no padding to a whole tile per device, no recomputation).
  """
  tiles = plan_tiles(covariance, image_shape, n_rows, n_cols, memory_bytes, backward=backward,
                     itemsize=itemsize)
  cols = _cdiv(n_cols, tiles.cols) * tiles.cols
  if tiles.rows >= n_rows and tiles.cols >= n_cols:
    share = _cdiv(n_rows, n_devices)
    return Layout(Tiles(share, n_cols), share, n_cols, 1, False)
  row_tiles = _cdiv(n_rows, tiles.rows)
  group = _cdiv(row_tiles, _MAX_GROUPS)
  groups_per_device = _cdiv(_cdiv(row_tiles, group), n_devices)
  return Layout(tiles, groups_per_device * group * tiles.rows, cols, group, backward)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _pad_rows(x: jax.Array, total: int) -> jax.Array:
  """Pads axis 0 to `total` rows with copies of row 0 (real data: finite kernels and gradients,
  and the padded rows are sliced off, so their cotangents are exactly zero)."""
  extra = total - x.shape[0]
  if extra == 0:
    return x
  return jnp.concatenate([x, jnp.broadcast_to(x[:1], (extra,) + x.shape[1:])])


def _blocks(x: jax.Array, size: int) -> jax.Array:
  return x.reshape((x.shape[0] // size, size) + x.shape[1:])


def tiled_kernel(kernel_fn: Callable, x1: jax.Array, x2: jax.Array, tiles: Tiles) -> jax.Array:
  """K(x1, x2) on one device, `tiles.rows x tiles.cols` entries at a time.

  x1: (n1, ...) with n1 a multiple of tiles.rows; x2: (n2, ...) with n2 a multiple of
  tiles.cols. Returns (n1, n2).
  """
  n1, n2 = x1.shape[0], x2.shape[0]
  if (n1, n2) == tiles:
    return kernel_fn(x1, x2)
  blocks2 = _blocks(x2, tiles.cols)
  k = jax.lax.map(lambda a: jax.lax.map(lambda b: kernel_fn(a, b), blocks2),
                  _blocks(x1, tiles.rows))
  return k.transpose(0, 2, 1, 3).reshape(n1, n2)


def _tiled_kernel_vjp(kernel_fn: Callable, x1: jax.Array, x2: jax.Array, cotangent: jax.Array,
                      layout: Layout) -> tuple[jax.Array, jax.Array]:
  """One device's gradients of <cotangent, K(x1, x2)>, recomputing one tile at a time.

  Returns (x1's gradient, x2's gradient summed over each group of `layout.group` row tiles:
  (n_groups, n2, ...)). Every sum runs in a fixed order: tile by tile within a group, and the
  groups are summed by the caller, so no sum depends on where the device boundaries fall.
  """
  rows, cols = layout.tiles
  blocks2 = _blocks(x2, cols)
  x1_groups = _blocks(_blocks(x1, rows), layout.group)
  g = cotangent.reshape(x1.shape[0] // rows, rows, x2.shape[0] // cols, cols)
  g_groups = _blocks(g.transpose(0, 2, 1, 3), layout.group)  # (groups, group, col tiles, r, c)

  def row_tile(x2_sum, tile):
    a, g_row = tile

    def col_tile(a_bar, block):
      b, g_tile = block
      _, vjp = jax.vjp(kernel_fn, a, b)
      da, db = vjp(g_tile)
      return a_bar + da, db

    a_bar, b_bar = jax.lax.scan(col_tile, jnp.zeros_like(a), (blocks2, g_row))
    return x2_sum + b_bar, a_bar

  def group(tiles):
    x2_sum, a_bars = jax.lax.scan(row_tile, jnp.zeros_like(blocks2), tiles)
    return a_bars, x2_sum

  a_bars, x2_sums = jax.lax.map(group, (x1_groups, g_groups))
  return a_bars.reshape(x1.shape), x2_sums.reshape((-1,) + x2.shape)


def shard_kernel(kernel_fn: Callable, covariance: str = "full", mesh: Mesh | None = None,
                 memory_bytes: float | None = None, *, backward: bool = False) -> Callable:
  """`kernel_fn` with its rows sharded over `mesh` and computed in tiles within `memory_bytes`
  per device; same signature, (n1, ...), (n2, ...) -> (n1, n2), usable inside `jit` and
  differentiable. `backward`: size the tiles for a differentiated kernel (KIP's loss).

  Args:
    kernel_fn: a symmetric kernel, K(a, b) = K(b, a)^T, as every NTK and NNGP is (the one-tile
      gradient uses it).
    covariance: what one entry keeps (`Kernel.covariance`), which sizes the tiles.
    mesh: default `make_mesh()` (every device).
    memory_bytes: per-device budget for one tile's intermediates; default
      `default_memory_bytes()`.

  The result is replicated on every device (what follows, a ridge solve, is small and then
  runs identically on any mesh). With more than one tile per device the gradient recomputes
  each tile instead of keeping every tile's intermediates (rematerialisation).
  """
  mesh = make_mesh() if mesh is None else mesh
  memory_bytes = default_memory_bytes() if memory_bytes is None else memory_bytes
  n_devices = mesh.size
  replicated = NamedSharding(mesh, P())

  def layout_for(n1: int, n2: int, image_shape: tuple[int, ...], itemsize: int = 4) -> Layout:
    return plan_layout(covariance, image_shape, n1, n2, memory_bytes, n_devices,
                       backward=backward, itemsize=itemsize)

  def sharded(x1: jax.Array, x2: jax.Array) -> jax.Array:
    n1, n2 = x1.shape[0], x2.shape[0]
    layout = layout_for(n1, n2, x1.shape[1:], jnp.dtype(x1.dtype).itemsize)
    if n_devices == 1 and not layout.remat:
      # One device, one tile: nothing to split or to sum in a fixed order, and JAX's own
      # gradient takes one backward pass where `_whole`'s takes one per argument.
      return kernel_fn(x1, x2)
    x1 = _pad_rows(x1, layout.rows_per_device * n_devices)
    x2 = _pad_rows(x2, layout.cols)
    k = (_tiled(x1, x2, layout) if layout.remat else _whole(x1, x2, layout, n1))
    return jax.lax.with_sharding_constraint(k[:n1, :n2], replicated)

  def _local_kernel(x1, x2, layout):
    return jax.shard_map(lambda a, b: tiled_kernel(kernel_fn, a, b, layout.tiles), mesh=mesh,
                         in_specs=(P(AXIS), P()), out_specs=P(AXIS))(x1, x2)

  # Several tiles per device: the backward pass recomputes one tile at a time, and sums x2's
  # gradient over row tiles in a fixed order (tiles and groups do not depend on the mesh).
  @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
  def _tiled(x1, x2, layout):
    return _local_kernel(x1, x2, layout)

  def _tiled_fwd(x1, x2, layout):
    return _local_kernel(x1, x2, layout), (x1, x2)

  def _tiled_bwd(layout, residuals, cotangent):
    x1, x2 = residuals
    x1_bar, x2_sums = jax.shard_map(
        lambda a, b, g: _tiled_kernel_vjp(kernel_fn, a, b, g, layout), mesh=mesh,
        in_specs=(P(AXIS), P(), P(AXIS)), out_specs=(P(AXIS), P(AXIS)),
        check_vma=False)(x1, x2, cotangent)
    x2_sums = jax.lax.with_sharding_constraint(x2_sums, replicated)
    x2_bar, _ = jax.lax.scan(lambda total, part: (total + part, None), jnp.zeros_like(x2),
                             x2_sums)
    return x1_bar, x2_bar

  _tiled.defvjp(_tiled_fwd, _tiled_bwd)

  # One tile per device: a device's share of rows depends on the mesh, so x2's gradient is not
  # summed across devices (the association would change with the device count). It comes from
  # K(x2, x1) = K(x1, x2)^T instead, with x2's rows sharded and all of x1 on every device: every
  # row of every gradient is then one device's sum over the same entries, whatever the mesh.
  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
  def _whole(x1, x2, layout, n1):
    return _local_kernel(x1, x2, layout)

  def _whole_fwd(x1, x2, layout, n1):
    return _local_kernel(x1, x2, layout), (x1, x2)

  def _whole_bwd(layout, n1, residuals, cotangent):
    x1, x2 = residuals

    def row_grads(a, b, g):
      return jax.vjp(lambda rows: kernel_fn(rows, b), a)[1](g)[0]

    x1_bar = jax.shard_map(row_grads, mesh=mesh, in_specs=(P(AXIS), P(), P(AXIS)),
                           out_specs=P(AXIS), check_vma=False)(x1, x2, cotangent)
    n2 = x2.shape[0]
    share = _cdiv(n2, n_devices)
    x2_rows = _pad_rows(x2, share * n_devices)
    g_t = jnp.pad(cotangent[:n1].T, ((0, share * n_devices - n2), (0, 0)))
    x2_bar = jax.shard_map(row_grads, mesh=mesh, in_specs=(P(AXIS), P(), P(AXIS)),
                           out_specs=P(AXIS), check_vma=False)(x2_rows, x1[:n1], g_t)
    return x1_bar, x2_bar[:n2]

  _whole.defvjp(_whole_fwd, _whole_bwd)
  sharded.layout = layout_for  # for logs, tests and benchmarks
  sharded.mesh = mesh
  sharded.memory_bytes = memory_bytes
  return sharded


def rows_per_call(kernel_fn: Callable, n_rows: int, n_cols: int, image_shape: tuple[int, ...],
                  tiles_per_device: int = 8) -> int:
  """Rows of x_rows per `stream_rows` call: everything when it fits in one tile per device,
  otherwise `tiles_per_device` row tiles on every device (a progress update every call)."""
  layout_for = getattr(kernel_fn, "layout", None)
  if layout_for is None:
    return min(n_rows, 1000)
  layout = layout_for(n_rows, n_cols, image_shape)
  if layout.rows_per_device == layout.tiles.rows and layout.tiles.cols >= n_cols:
    return n_rows  # one tile per device holds every row

  return min(n_rows, kernel_fn.mesh.size * layout.tiles.rows * tiles_per_device)


def replicate(x, mesh: Mesh) -> jax.Array:
  """`x` (host or device) as an array replicated on every device of `mesh`."""
  return jax.device_put(x, NamedSharding(mesh, P()))


def stream_rows(kernel_fn: Callable, x_rows: np.ndarray, x_cols: jax.Array,
                block_rows: int, params=None) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (start, K(x_rows[start:start + block_rows], x_cols)) as host arrays, block by block.

  Every block is padded to `block_rows`, so the jitted (sharded) kernel compiles once; only one
  block's result lives on the devices, and every process receives every block. A kernel from
  `shard_kernel` runs on its mesh; any other kernel_fn on the first device. With `params`, the
  kernel is `kernel_fn(params, x1, x2)` (`kip.kernels.Kernel.apply`), else `kernel_fn(x1, x2)`.
  """
  mesh = getattr(kernel_fn, "mesh", None) or make_mesh(jax.devices()[:1])
  replicated = NamedSharding(mesh, P())
  call = with_params(kernel_fn, params, replicated)
  x_cols = replicate(jnp.asarray(x_cols), mesh)
  with jax.default_matmul_precision("highest"):
    for start in range(0, len(x_rows), block_rows):
      block = np.asarray(x_rows[start:start + block_rows], x_cols.dtype)
      rows = len(block)
      if rows < block_rows:
        block = np.concatenate([block, np.repeat(block[:1], block_rows - rows, axis=0)])
      yield start, np.asarray(call(replicate(block, mesh), x_cols))[:rows]


def with_params(kernel_fn: Callable, params=None, out_sharding=None
                ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A jitted (x1, x2) -> K: `kernel_fn(x1, x2)`, or `kernel_fn(params, x1, x2)` with `params`
  passed as an argument of the compiled program (not baked in as a constant)."""
  if params is None:
    return jax.jit(kernel_fn, out_shardings=out_sharding)
  fn = jax.jit(kernel_fn, out_shardings=out_sharding)
  return lambda x1, x2: fn(params, x1, x2)


def shard_features(features_fn: Callable, mesh: Mesh | None = None, chunk_rows: int = 256
                   ) -> Callable:
  """`features_fn(params, x) -> (n, D)` with the images sharded over `mesh`, each device
  computing its share in chunks of `chunk_rows` images one after another (`lax.map`), and the
  features gathered on every device. The chunk shape depends only on the number of rows, never
  on the device count, so the features are identical on any mesh; a feature kernel is then one
  matmul of gathered features (`shard_feature_kernel`)."""
  mesh = make_mesh() if mesh is None else mesh
  n_devices = mesh.size
  replicated = NamedSharding(mesh, P())

  def sharded(params, x: jax.Array) -> jax.Array:
    n = x.shape[0]
    chunk = min(chunk_rows, n)
    per_device = _cdiv(_cdiv(n, chunk), n_devices) * chunk
    padded = _pad_rows(x, per_device * n_devices)

    def local(p, rows):
      out = jax.lax.map(lambda block: features_fn(p, block), _blocks(rows, chunk))
      return out.reshape((rows.shape[0],) + out.shape[2:])

    f = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS))(
        params, padded)
    return jax.lax.with_sharding_constraint(f[:n], replicated)

  sharded.mesh = mesh
  return sharded


def shard_feature_kernel(features_fn: Callable, mesh: Mesh | None = None,
                         chunk_rows: int = 256) -> Callable:
  """(params, x1, x2) -> phi(x1) phi(x2)^T with the features computed by `shard_features`."""
  features = shard_features(features_fn, mesh, chunk_rows)

  def kernel(params, x1: jax.Array, x2: jax.Array) -> jax.Array:
    with jax.default_matmul_precision("highest"):
      return features(params, x1) @ features(params, x2).T

  kernel.mesh = features.mesh
  return kernel
