"""Moment matching: the smallest complete distiller, written to show what a new method costs (one
file here and a command of a few lines in `experiments/`; see docs/extending.md). Not a paper's
method: distribution matching (DM's idea) with random linear features in place of a network.

Each step draws a random projection `P` (pixels -> `features`, Gaussian, from the step's key) and,
per class, matches the mean and the standard deviation of `P x` over a real batch and over the
class's synthetic images: `loss = sum_c ||mean_r - mean_s||^2 + ||std_r - std_s||^2`. Images by
Adam; labels stay one-hot.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kip import cli
from kip.command import Job
from kip.loop import LoopConfig
from kip.method import Batch, Data, Method
from kip.pipeline import distill, initial_support
from methods.flags import PreprocessConfig, prepare_data

__all__ = ["make_moments", "Config", "JOB"]


class MomentState(NamedTuple):
  x: jax.Array  # (n, H, W, C) synthetic images
  y: jax.Array  # (n, C) their fixed labels
  opt_state: Any


def make_moments(*, real_batch: int, features: int = 256, lr: float = 0.05) -> Method:
  """Moment matching as a `kip.method.Method` on class-balanced real batches of `real_batch`."""
  optimizer = optax.adam(lr)

  def moments(key, x, y):  # per-class mean and std of random features: (C, features) each
    flat = x.reshape(len(x), -1)
    f = flat @ (jax.random.normal(key, (flat.shape[1], features)) / jnp.sqrt(flat.shape[1]))
    member = jax.nn.one_hot(jnp.argmax(y, -1), y.shape[-1]).T  # (C, n)
    count = jnp.maximum(member.sum(1, keepdims=True), 1.0)
    mean = member @ f / count
    var = member @ (f * f) / count - mean**2
    return mean, jnp.sqrt(jnp.maximum(var, 1e-12))

  def loss_fn(x, y, key, x_real, y_real):
    m_r, s_r = moments(key, x_real, y_real)
    m_s, s_s = moments(key, x, y)
    return jnp.sum((m_r - m_s) ** 2) + jnp.sum((s_r - s_s) ** 2)

  def init(key, x_init, y_init) -> MomentState:
    x = jnp.asarray(x_init, jnp.float32)
    return MomentState(x, jnp.asarray(y_init, jnp.float32), optimizer.init(x))

  @functools.partial(jax.jit, donate_argnums=0)
  def update(state: MomentState, batch: Batch, key, step):
    loss, grad = jax.value_and_grad(loss_fn)(state.x, state.y, key, batch.x, batch.y)
    updates, opt_state = optimizer.update(grad, state.opt_state, state.x)
    return MomentState(optax.apply_updates(state.x, updates), state.y, opt_state), {"loss": loss}

  def export(state: MomentState) -> dict[str, jax.Array]:
    return {"images": state.x, "labels": state.y}

  return Method(init, update, export, Data("labelled", real_batch))


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig, PreprocessConfig, cli.DataConfig):
  ipc: int = cli.field(10, "synthetic images per class", minimum=1)
  steps: int = cli.field(500, "matching steps", minimum=1)
  lr: float = cli.field(0.05, "Adam learning rate of the images", above=0)
  features: int = cli.field(256, "random features per step", minimum=1)
  real_batch: int = cli.field(640, "class-balanced real images per step", minimum=1)
  checkpoint_every: int = cli.field(100, "steps between checkpoints", minimum=1)


def run(config: Config, workdir: str, devices) -> list[str]:
  data = prepare_data(config.dataset, preprocess=config.preprocessing(), data_dir=config.data_dir,
                      manual_dir=config.manual_dir, seed=config.seed)
  x_init, y_init = initial_support(data, config.ipc, config.seed)
  method = make_moments(real_batch=config.real_batch, features=config.features, lr=config.lr)
  meta = {"method": "moments", "dataset": config.dataset, "seed": config.seed,
          "ipc": config.ipc, "config": dataclasses.asdict(config)}
  loop = LoopConfig(steps=config.steps, eval_every=0, seed=config.seed,
                    checkpoint_every=config.checkpoint_every)
  distill(method, data, workdir=workdir, loop_config=loop, x_init=x_init, y_init=y_init,
          meta=meta, log=cli.log, progress=config.progress)
  return [f"distilled set: {workdir}/distilled.npz (train networks on it: python -m "
          "experiments.transfer --support FILE --protocol dc)"]


JOB = Job("moments", Config, run, folder=lambda c: [c.dataset, f"ipc{c.ipc}"])
