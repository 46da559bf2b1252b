"""KRR and Label Solve against float64 NumPy."""

import numpy as np
import pytest

from kip.kernels import make_kernel
from kip.krr import add_ridge, evaluate, evaluate_labels, krr_predict
from kip.sharding import shard_kernel, stream_rows
from methods.label_solve import label_solve

RNG = np.random.default_rng(0)


def spd(n):
  a = RNG.normal(size=(n, n))
  return a @ a.T + n * np.eye(n)


def test_krr_predict_matches_float64_solve():
  k_ss, k_ts = spd(20), RNG.normal(size=(7, 20))
  y = RNG.normal(size=(20, 3))
  reg = 1e-3
  ridge = k_ss + reg * np.trace(k_ss) / 20 * np.eye(20)
  expected = k_ts @ np.linalg.solve(ridge, y)
  got = krr_predict(k_ts.astype(np.float32), k_ss.astype(np.float32), y.astype(np.float32), reg)
  assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4
  np.testing.assert_allclose(add_ridge(np.eye(4), 0.5), 1.5 * np.eye(4))


def fc_numpy(x1, x2):
  """The depth-1 FC NTK in float64, for references independent of neural-tangents."""
  from test_compat import arccos_fc

  return arccos_fc(x1, x2, 1)[1]


@pytest.mark.parametrize("sharded", [False, True])
def test_streamed_kernel_blocks_match_whole_kernel_reference(sharded):
  kernel = make_kernel("fc")
  kernel_fn = (shard_kernel(kernel.kernel_fn, "none", memory_bytes=2000) if sharded
               else kernel.kernel_fn)  # 2000 bytes: tiles of a few entries
  rng = np.random.default_rng(5)  # its own draw: the module's RNG depends on the test order
  x1 = rng.normal(size=(23, 3, 3, 1)).astype(np.float32)
  x2 = rng.normal(size=(6, 3, 3, 1)).astype(np.float32)
  got = np.concatenate([k for _, k in stream_rows(kernel_fn, x1, x2, block_rows=5)])
  assert got.shape == (23, 6)
  # float32 entries of order 1: an absolute 1e-6 for the ones near zero (one drawn at -0.0084
  # was 1.2e-7 off, 1.5e-5 relative).
  np.testing.assert_allclose(got, fc_numpy(x1, x2), rtol=1e-5, atol=1e-6)


def test_evaluate_matches_numpy_krr():
  kernel = make_kernel("fc")
  xs = RNG.normal(size=(10, 2, 2, 1)).astype(np.float32)
  ys = np.eye(3)[RNG.integers(0, 3, 10)] - 1 / 3
  xt = RNG.normal(size=(37, 2, 2, 1)).astype(np.float32)
  labels = RNG.integers(0, 3, 37)
  k_ss, k_ts = fc_numpy(xs, xs), fc_numpy(xt, xs)
  pred = k_ts @ np.linalg.solve(k_ss + 1e-6 * np.trace(k_ss) / 10 * np.eye(10), ys)
  result = evaluate(kernel.kernel_fn, xs, ys.astype(np.float32), xt, labels, block_rows=8)
  assert result["test_acc"] == pytest.approx(np.mean(pred.argmax(1) == labels))
  targets = np.eye(3)[labels] - 1 / 3
  assert result["test_mse"] == pytest.approx(0.5 * np.mean((pred - targets) ** 2), rel=1e-3)
  # Several label sets in one pass over the test kernel: each as if evaluated alone.
  other = (np.eye(3)[RNG.integers(0, 3, 10)] - 1 / 3).astype(np.float32)
  both = evaluate_labels(kernel.kernel_fn, xs, [ys.astype(np.float32), other], xt, labels)
  assert both[0] == pytest.approx(result)
  assert both[1] == pytest.approx(evaluate(kernel.kernel_fn, xs, other, xt, labels))


def test_label_solve_is_the_least_squares_optimum():
  """The solved labels minimise ||K_ts (K_ss + ridge)^-1 y_s - y_t||: compare with NumPy's
  least squares in float64, and check they beat the one-hot labels on the target loss."""
  kernel = make_kernel("fc")
  xs = RNG.normal(size=(6, 3, 3, 1)).astype(np.float32)
  xt = RNG.normal(size=(50, 3, 3, 1)).astype(np.float32)
  yt = (np.eye(2)[RNG.integers(0, 2, 50)] - 0.5).astype(np.float32)
  reg = 1e-6
  got = label_solve(kernel.kernel_fn, xs, xt, yt, reg=reg, block_rows=16)
  k_ss, k_ts = fc_numpy(xs, xs), fc_numpy(xt, xs)
  ridge = k_ss + reg * np.trace(k_ss) / 6 * np.eye(6)
  z, *_ = np.linalg.lstsq(k_ts, yt.astype(np.float64), rcond=None)
  expected = ridge @ z

  def loss(y):
    return np.mean((k_ts @ np.linalg.solve(ridge, y) - yt) ** 2)

  assert loss(got) == pytest.approx(loss(expected), rel=1e-3)
  assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-2
  assert loss(got) < loss(np.eye(2)[RNG.integers(0, 2, 6)] - 0.5)
  with pytest.raises(ValueError, match="at least as many targets"):
    label_solve(kernel.kernel_fn, xt, xs, yt[:6])


def test_float64_on_request_matches_numpy_to_round_off():
  import jax
  import jax.numpy as jnp

  k_ss, k_ts = spd(30), RNG.normal(size=(9, 30))
  y = RNG.normal(size=(30, 4))
  ridge = k_ss + 1e-6 * np.trace(k_ss) / 30 * np.eye(30)
  expected = k_ts @ np.linalg.solve(ridge, y)
  with jax.enable_x64(True):
    got = krr_predict(jnp.asarray(k_ts), jnp.asarray(k_ss), jnp.asarray(y))
    assert got.dtype == jnp.float64
    kernel = make_kernel("fc")
    xs = RNG.normal(size=(8, 2, 2, 1))
    xt = RNG.normal(size=(13, 2, 2, 1))
    ys = np.eye(2)[np.arange(8) % 2] - 0.5
    labels = RNG.integers(0, 2, 13)
    result = evaluate(kernel.kernel_fn, xs, ys, xt, labels, block_rows=5, dtype=jnp.float64)
  assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-12
  pred = fc_numpy(xt, xs) @ np.linalg.solve(
      fc_numpy(xs, xs) + 1e-6 * np.trace(fc_numpy(xs, xs)) / 8 * np.eye(8), ys)
  targets = np.eye(2)[labels] - 0.5
  # 1e-8, not round-off: neural-tangents clips and guards its arccos; float32 would be ~1e-6.
  assert result["test_mse"] == pytest.approx(0.5 * np.mean((pred - targets) ** 2), rel=1e-8)
