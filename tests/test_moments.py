"""Moment matching (methods/moments.py, the extension example): its loss against float64 NumPy,
learning on real data, and a resumed run equal to an uninterrupted one."""

import jax
import numpy as np
import pytest
from conftest import assert_resumed_equals_straight

from kip.loop import LoopConfig, run
from kip.method import Batch, make_sampler
from methods.moments import make_moments

RNG = np.random.default_rng(0)
SHAPE, CLASSES = (6, 6, 1), 4
X = RNG.normal(size=(80, *SHAPE)).astype(np.float32) + np.repeat(np.arange(CLASSES), 20)[
    :, None, None, None]
LABELS = np.repeat(np.arange(CLASSES), 20)
Y = (np.eye(CLASSES)[LABELS] - 1 / CLASSES).astype(np.float32)


def numpy_loss(key, x, y, x_real, y_real, features):
  p = np.asarray(jax.random.normal(key, (int(np.prod(SHAPE)), features)), np.float64)
  p /= np.sqrt(np.prod(SHAPE))

  def moments(images, targets):
    f = images.reshape(len(images), -1).astype(np.float64) @ p
    labels = targets.argmax(1)
    return (np.stack([f[labels == c].mean(0) for c in range(CLASSES)]),
            np.stack([f[labels == c].std(0) for c in range(CLASSES)]))

  (m_r, s_r), (m_s, s_s) = moments(x_real, y_real), moments(x, y)
  return np.sum((m_r - m_s) ** 2) + np.sum((s_r - s_s) ** 2)


def test_the_loss_matches_numpy_and_falls():
  method = make_moments(real_batch=40, features=16, lr=0.05)
  x_s, y_s = X[::10].copy(), Y[::10].copy()  # 2 per class
  state = method.init(jax.random.key(0), x_s, y_s)
  batch = Batch(X[1::2], Y[1::2])
  expected = numpy_loss(jax.random.key(3), x_s, y_s, batch.x, batch.y, 16)
  _, metrics = method.update(state, batch, jax.random.key(3), 1)
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
  state = method.init(jax.random.key(0), x_s, y_s)
  losses = []
  for step in range(1, 60):
    state, metrics = method.update(state, batch, jax.random.key(0), step)  # one projection
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.2 * losses[0]


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
  method = make_moments(real_batch=20, features=8)

  def go(folder, m):
    return run(m, workdir=str(tmp_path / folder),
               config=LoopConfig(steps=6, eval_every=0, checkpoint_every=2, seed=1),
               sampler=make_sampler(m.data, X, LABELS, Y, seed=1), x_init=X[::10],
               y_init=Y[::10], log=lambda _: None, progress=False)

  assert_resumed_equals_straight(go, method, after=3)
