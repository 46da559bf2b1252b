"""KIP: the loss against a float64 NumPy reference, label learning on/off, one compilation."""

import jax
import numpy as np
import pytest
from test_compat import arccos_fc

from kip.kernels import make_kernel
from kip.method import Batch
from methods.kip import make_kip

RNG = np.random.default_rng(0)


def problem(n_s=6, n_t=40, classes=3):
  xs = RNG.normal(size=(n_s, 3, 3, 1)).astype(np.float32)
  ys = (np.eye(classes)[np.arange(n_s) % classes] - 1 / classes).astype(np.float32)
  xt = RNG.normal(size=(n_t, 3, 3, 1)).astype(np.float32)
  yt = (np.eye(classes)[RNG.integers(0, classes, n_t)] - 1 / classes).astype(np.float32)
  return xs, ys, xt, yt


def numpy_loss(xs, ys, xt, yt, reg=1e-6):
  k_ss, k_ts = arccos_fc(xs, xs, 1)[1], arccos_fc(xt, xs, 1)[1]
  pred = k_ts @ np.linalg.solve(k_ss + reg * np.trace(k_ss) / len(xs) * np.eye(len(xs)), ys)
  return 0.5 * np.mean((pred - yt) ** 2)


@pytest.mark.parametrize("learn_labels", [True, False])
def test_kip_step_loss_matches_numpy_and_descends(learn_labels):
  xs, ys, xt, yt = problem()
  method = make_kip(make_kernel("fc").apply, lr=0.04, learn_labels=learn_labels)
  state = method.init(jax.random.key(0), xs, ys)
  losses = []
  for step in range(20):
    state, metrics = method.update(state, Batch(xt, yt), jax.random.key(step), step)
    losses.append(float(metrics["loss"]))
  assert losses[0] == pytest.approx(numpy_loss(xs, ys, xt, yt), rel=1e-3)
  x, y = method.export(state)["images"], method.export(state)["labels"]
  # The metrics' loss is the loss before the step: the support the last step started from is
  # unknown here, so check the final support's loss against NumPy directly instead.
  assert numpy_loss(np.asarray(x), np.asarray(y), xt, yt) < losses[-1] * 1.05
  assert losses[-1] < 0.8 * losses[0]
  assert not np.allclose(x, xs)
  if learn_labels:
    assert not np.allclose(y, ys)
  else:
    np.testing.assert_array_equal(y, ys)
  # One compiled update for the whole run (same shapes every step).
  assert method.update._cache_size() == 1



@pytest.mark.slow
def test_kip_on_real_mnist_beats_its_initial_support(mnist):
  """A few KIP steps on real MNIST (FC NTK, 2 images per class) raise KRR accuracy on held-out
  real images above the real-image initialisation."""
  from kip.data import (
    centered_one_hot,
    class_balanced_indices,
    fit_preprocessor,
    sample_target_batch,
  )
  from kip.krr import evaluate

  train, test = mnist["train"], mnist["test"]
  pre = fit_preprocessor(train.images)
  idx = class_balanced_indices(train.labels, 2, np.random.default_rng(0))
  xs, ys = pre.apply(train.images[idx]), centered_one_hot(train.labels[idx], 10)
  x_test, l_test = pre.apply(test.images[:2000]), test.labels[:2000]
  kernel = make_kernel("fc")
  method = make_kip(kernel.apply)
  state = method.init(jax.random.key(0), xs, ys)
  before = evaluate(kernel.kernel_fn, xs, ys, x_test, l_test)["test_acc"]
  for step in range(40):
    batch = sample_target_batch(train.labels, 500, 0, step, 10)
    state, _ = method.update(state, Batch(pre.apply(train.images[batch]),
                                          centered_one_hot(train.labels[batch], 10)),
                             jax.random.key(step), step)
  after = evaluate(kernel.kernel_fn, state.x, state.y, x_test, l_test)["test_acc"]
  assert after > before + 0.05, (before, after)


def test_float64_kip_loss_matches_numpy_to_round_off():
  import jax.numpy as jnp

  xs, ys, xt, yt = problem()
  with jax.enable_x64(True):
    method = make_kip(make_kernel("fc").apply, dtype=jnp.float64)
    state = method.init(jax.random.key(0), xs, ys)
    state, metrics = method.update(state, Batch(xt, yt), jax.random.key(0), 0)
    assert state.x.dtype == jnp.float64
  assert float(metrics["loss"]) == pytest.approx(numpy_loss(xs, ys, xt, yt), rel=1e-9)
