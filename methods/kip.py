"""KIP, Kernel Inducing Points (Nguyen et al., ICLR 2021): learn support images (and labels).

One step: on a class-balanced target batch, predict the targets by kernel ridge regression from the
support set, `pred = K_ts (K_ss + reg * tr(K_ss)/n_s * I)^-1 y_s`, and take an Adam step on the
support images (and, with `learn_labels`, the support labels) against `0.5 * mean((pred - y_t)^2)`.

`make_kip(...)` returns a `kip.method.Method`: pure functions, hyperparameters in the closure,
arrays in the state, `update` compiled once. The kernel is any `kernel_fn(params, x1, x2)`: an
analytic NTK/NNGP (no parameters), or a neural-feature / empirical-NTK kernel of a Flax net whose
parameters `kernel_init(key)` draws once and the state keeps (`kip.kernels`).

`Config`, `run_kip` and `JOB` are the job `experiments.kip` runs: the flags, the distillation with
a KRR evaluation on the test split, and the command's description.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from kip import cli
from kip.command import Devices, Job
from kip.krr import DEFAULT_REG, accuracy, krr_predict, mse_loss
from kip.loop import LoopConfig
from kip.method import Batch, Data, Method
from kip.pipeline import distill, initial_support, krr_evaluator, make_evaluator, shard_kernels
from methods.flags import KernelConfig, PreprocessConfig, prepare_data

__all__ = ["KipState", "make_kip", "Config", "run_kip", "run", "JOB"]


class KipState(NamedTuple):
  """x: (n_s, H, W, C) float32 support images; y: (n_s, C) float32 labels; opt_state: Adam's;
  kernel_params: the kernel's parameters (an empty tuple for analytic kernels)."""

  x: jax.Array
  y: jax.Array
  opt_state: optax.OptState
  kernel_params: Any = ()


def make_kip(kernel_fn: Callable[[Any, jax.Array, jax.Array], jax.Array], *, lr: float = 0.04,
             learn_labels: bool = True, reg: float = DEFAULT_REG, target_batch: int = 5000,
             kernel_init: Callable[[jax.Array], Any] | None = None, mesh=None,
             dtype=jnp.float32) -> Method:
  """KIP with Adam(lr) on the support images, and on the labels when `learn_labels`.

  Args:
    kernel_fn: (params, (n1, H, W, C), (n2, H, W, C)) -> (n1, n2), differentiable in both image
      arguments; `kip.kernels.Kernel.apply`, or one sharded by `kip.sharding`.
    lr: Adam learning rate (the authors' colab: 0.04).
    learn_labels: also learn the support labels; otherwise they stay as initialised.
    reg: ridge strength relative to tr(K_ss)/n_s (the authors': 1e-6).
    target_batch: class-balanced real images per step.
    kernel_init: key -> the kernel's parameters (default: none).
    mesh: the mesh a sharded kernel computes on; the state is replicated there, as the step's
      outputs are (so the second step does not recompile, and on several hosts the state is one
      global array).
    dtype: of the support set and its optimiser state; float64 needs `jax.enable_x64()`.
  """
  if lr <= 0 or reg < 0:
    raise ValueError(f"KIP needs lr > 0 and reg >= 0, got lr {lr}, reg {reg}")
  optimizer = optax.adam(lr)

  def trainable(x, y):
    return (x, y) if learn_labels else (x,)

  def loss_fn(params, y_fixed, kernel_params, x_target, y_target):
    x_support = params[0]
    y_support = params[1] if learn_labels else y_fixed
    with jax.default_matmul_precision("highest"):
      # Two calls, not one on [x_t; x_s]: a joint call would also differentiate w.r.t. the
      # target rows, a wasted (n_t x d) gradient as large as the useful one.
      k_ts = kernel_fn(kernel_params, x_target, x_support)
      k_ss = kernel_fn(kernel_params, x_support, x_support)
      pred = krr_predict(k_ts, k_ss, y_support, reg)
    return mse_loss(pred, y_target), pred

  def init(key: jax.Array, x_init: jax.Array, y_init: jax.Array) -> KipState:
    x_init, y_init = jnp.asarray(x_init, dtype), jnp.asarray(y_init, dtype)
    kernel_params = () if kernel_init is None else kernel_init(key)
    state = KipState(x_init, y_init, optimizer.init(trainable(x_init, y_init)), kernel_params)
    if mesh is not None:
      state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    return state

  # The state is donated: the new support and Adam moments reuse its buffers in place.
  @functools.partial(jax.jit, donate_argnums=0)
  def update(state: KipState, batch: Batch, key: jax.Array, step: jax.Array):
    del key, step  # KIP's step is deterministic given the target batch
    params = trainable(state.x, state.y)
    x_target, y_target = batch.x.astype(state.x.dtype), batch.y.astype(state.x.dtype)
    (loss, pred), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state.y, state.kernel_params, x_target, y_target)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    y = params[1] if learn_labels else state.y
    metrics = {"loss": loss, "target_acc": accuracy(pred, jnp.argmax(y_target, -1)),
               "grad_norm": optax.global_norm(grads)}
    return KipState(params[0], y, opt_state, state.kernel_params), metrics

  def export(state: KipState) -> dict[str, jax.Array]:
    return {"images": state.x, "labels": state.y}

  return Method(init, update, export, Data("labelled", target_batch),
                state_sharding=None if mesh is None else NamedSharding(mesh, PartitionSpec()))


@dataclasses.dataclass(frozen=True)
class Config(cli.DeviceConfig, cli.RunConfig, KernelConfig, PreprocessConfig, cli.DataConfig):
  ipc: int = cli.field(10, "support images per class", minimum=1)
  steps: int = cli.field(1000, "KIP (Adam) steps", minimum=1)
  lr: float = cli.field(0.04, "Adam learning rate (the authors' colab: 0.04)", above=0)
  target_batch: int = cli.field(5000, "class-balanced real target images per step", minimum=1)
  learn_labels: bool = cli.field(True, "learn the support labels too")
  init: str = cli.field("real", "initial support images", choices=("real", "noise"))
  eval_every: int = cli.field(100, "steps between KRR evaluations on the full test split (0: "
                                   "only at the end)", minimum=0)
  checkpoint_every: int = cli.field(100, "steps between checkpoints (and distilled.npz updates)",
                                    minimum=1)
  val_size: int = cli.field(0, "hold out this many training images and evaluate on them "
                               "instead of test", minimum=0)
  float64: bool = cli.field(False, "kernels, solves and the support set in float64 (slower)")


def run_kip(config: Config, workdir: str, mesh=None, memory_bytes: float | None = None
            ) -> dict[str, float]:
  """Runs KIP as configured in `workdir`, its kernel blocks across `mesh` (default: every
  device) within `memory_bytes` per device; returns the final test metrics."""
  with jax.enable_x64(config.float64):
    return _run(config, workdir, jnp.float64 if config.float64 else jnp.float32, mesh,
                memory_bytes)


def _run(config: Config, workdir: str, dtype, mesh, memory_bytes) -> dict[str, float]:
  data = prepare_data(config.dataset, preprocess=config.preprocessing(), data_dir=config.data_dir,
                      manual_dir=config.manual_dir, val_size=config.val_size, seed=config.seed)
  cli.log(f"{config.dataset}: {len(data.x_train)} train, {len(data.x_test)} "
          f"{'validation' if config.val_size else 'test'} images; {data.preprocessor.name}")
  kernel = config.make_kernel(data)
  x_init, y_init = initial_support(data, config.ipc, config.seed, config.init)
  step_kernel, eval_kernel = shard_kernels(kernel, mesh, memory_bytes)
  cli.log_kernel_layouts(step_kernel, eval_kernel, len(x_init),
                         {"K(target, support)": config.target_batch,
                          "K(support, support)": len(x_init),
                          "K(test, support)": len(data.x_test)},
                         data.x_train.shape[1:], jnp.dtype(dtype).itemsize)
  method = make_kip(step_kernel, lr=config.lr, learn_labels=config.learn_labels,
                    reg=config.reg, target_batch=config.target_batch, kernel_init=kernel.init,
                    mesh=getattr(step_kernel, "mesh", None), dtype=dtype)
  meta = {"method": "kip", "dataset": config.dataset, "kernel": kernel.name,
          "seed": config.seed, "ipc": config.ipc, "config": dataclasses.asdict(config)}
  evaluate = make_evaluator(eval_kernel, data, reg=config.reg, dtype=dtype,
                            progress=config.progress)
  cli.log(f"host memory before the first kernel: {cli.peak_rss_mib():.0f} MiB peak RSS")
  loop_config = LoopConfig(steps=config.steps, eval_every=config.eval_every,
                           eval_at_start=config.eval_every > 0,
                           checkpoint_every=config.checkpoint_every, seed=config.seed)
  result = distill(method, data, workdir=workdir, loop_config=loop_config, x_init=x_init,
                   y_init=y_init, meta=meta, log=cli.log, progress=config.progress,
                   evaluators=[krr_evaluator(evaluate, method,
                                             params=lambda state: state.kernel_params)])
  return result.evals


def run(config: Config, workdir: str, devices: Devices) -> list[str]:
  """`experiments.kip`'s job: KIP in `workdir` on `devices`; the final KRR test accuracy."""
  result = run_kip(config, workdir, devices.mesh, devices.memory_bytes)
  cli.log(f"peak host memory: {cli.peak_rss_mib():.0f} MiB RSS")
  return [f"final KRR test accuracy: {100 * result['test_acc']:.2f}% "
          f"(test MSE {result['test_mse']:.5f}); distilled set: "
          f"{os.path.join(workdir, 'distilled.npz')}"]


JOB = Job("kip", Config, run, folder=lambda c: [c.dataset, c.kernel, f"ipc{c.ipc}"])
