"""Kernel ridge regression: ridge solve, predict, loss, accuracy, evaluation.

Ridge is `K + reg * tr(K)/n * I`, solved by Cholesky (never an explicit inverse), in float32 with
the highest matmul precision by default; pass float64 arrays (inside `jax.enable_x64()`) for a
float64 solve.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from kip.sharding import rows_per_call, stream_rows, with_params

__all__ = ["DEFAULT_REG", "add_ridge", "krr_fit", "krr_predict", "mse_loss", "accuracy",
           "evaluate", "evaluate_labels", "ridge_solve_host", "add_ridge_host"]

DEFAULT_REG = 1e-6


def add_ridge(k_ss: jax.Array, reg: float) -> jax.Array:
  """(n, n) kernel -> K + reg * tr(K)/n * I."""
  n = k_ss.shape[0]
  return k_ss + reg * jnp.trace(k_ss) / n * jnp.eye(n, dtype=k_ss.dtype)


def krr_fit(k_ss: jax.Array, y_s: jax.Array, reg: float = DEFAULT_REG) -> jax.Array:
  """Dual coefficients alpha = (K_ss + ridge)^-1 y_s: (n_s, n_s), (n_s, C) -> (n_s, C).

  `solve(assume_a="pos")` is a Cholesky solve wrapped in `lax.custom_linear_solve`: its gradient
  re-uses the factor, where differentiating `cho_factor` itself costs twice the whole KIP step.
  """
  with jax.default_matmul_precision("highest"):
    return jsl.solve(add_ridge(k_ss, reg), y_s, assume_a="pos")


def krr_predict(k_ts: jax.Array, k_ss: jax.Array, y_s: jax.Array,
                reg: float = DEFAULT_REG) -> jax.Array:
  """KRR prediction K_ts (K_ss + ridge)^-1 y_s: (n_t, n_s), (n_s, n_s), (n_s, C) -> (n_t, C)."""
  with jax.default_matmul_precision("highest"):
    return k_ts @ krr_fit(k_ss, y_s, reg)


def mse_loss(pred: jax.Array, y: jax.Array) -> jax.Array:
  """KIP's loss: 0.5 * mean((pred - y)^2) over every entry."""
  return 0.5 * jnp.mean((pred - y) ** 2)


def accuracy(pred: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of rows of (n, C) `pred` whose argmax equals the (n,) int `labels`."""
  return jnp.mean(jnp.argmax(pred, axis=-1) == labels)


def evaluate(kernel_fn: Callable, x_support: jax.Array, y_support: jax.Array,
             x_test: np.ndarray, labels_test: np.ndarray, *, reg: float = DEFAULT_REG,
             block_rows: int | None = None, progress: Callable | None = None,
             dtype=None, params=None) -> dict[str, float]:
  """KRR test accuracy and MSE of a support set, the test kernel streamed in blocks.

  `kernel_fn` may be a `kip.sharding.shard_kernel` (blocks across its devices). `dtype=
  jnp.float64` (inside `jax.enable_x64()`) computes kernels and solve in float64.

  Args:
    x_support: (n_s, H, W, C) float32; y_support: (n_s, C) float32.
    x_test: (n_test, H, W, C) float32 (host); labels_test: (n_test,) int.
    block_rows: test rows per kernel call (default `kip.sharding.rows_per_call`).
    params: the kernel's parameters; given, the kernel is `kernel_fn(params, x1, x2)`.

  Returns:
    {"test_acc", "test_mse"}, MSE against centred one-hot targets, KIP's loss convention.
  """
  return evaluate_labels(kernel_fn, x_support, [y_support], x_test, labels_test, reg=reg,
                         block_rows=block_rows, progress=progress, dtype=dtype,
                         params=params)[0]


def evaluate_labels(kernel_fn: Callable, x_support: jax.Array, y_supports: list[jax.Array],
                    x_test: np.ndarray, labels_test: np.ndarray, *, reg: float = DEFAULT_REG,
                    block_rows: int | None = None, progress: Callable | None = None,
                    dtype=None, params=None) -> list[dict[str, float]]:
  """`evaluate` for several label sets of the same support images, the test kernel computed once.

  Predictions `K_test,s (K_ss + ridge)^-1 y` for every label set accumulate on the host, block by
  block; the (n_test, n_s) kernel itself is never kept.
  """
  x_support = jnp.asarray(x_support, dtype)
  with jax.default_matmul_precision("highest"):
    k_ss = with_params(kernel_fn, params)(x_support, x_support)
    alphas = [np.asarray(krr_fit(k_ss, jnp.asarray(y, x_support.dtype), reg), np.float64)
              for y in y_supports]
  alpha = np.concatenate(alphas, axis=1)
  if block_rows is None:
    block_rows = rows_per_call(kernel_fn, len(x_test), len(x_support), x_test.shape[1:])
  pred = np.empty((len(x_test), alpha.shape[1]))
  for start, k_block in stream_rows(kernel_fn, x_test, x_support, block_rows, params):
    pred[start:start + len(k_block)] = k_block.astype(np.float64) @ alpha
    if progress is not None:
      progress(len(k_block))
  results, column = [], 0
  for a in alphas:
    p = pred[:, column:column + a.shape[1]]
    column += a.shape[1]
    targets = np.eye(a.shape[1])[labels_test] - 1.0 / a.shape[1]
    results.append({"test_acc": float(np.mean(p.argmax(1) == labels_test)),
                    "test_mse": float(0.5 * np.mean((p - targets) ** 2))})
  return results


def ridge_solve_host(a: np.ndarray, b: np.ndarray, reg: float) -> np.ndarray:
  """(A + reg tr(A)/n I)^-1 b in float64 on the host (Cholesky): (n, n), (n, C) -> (n, C)."""
  return _ridge_solve(np.asarray(a, np.float64), np.asarray(b, np.float64), reg)


def add_ridge_host(a: np.ndarray, reg: float) -> np.ndarray:
  """A + reg tr(A)/n I, float64 on the host."""
  return _ridge(np.asarray(a, np.float64), reg)


def _ridge(a: np.ndarray, reg: float) -> np.ndarray:
  return a + reg * np.trace(a) / len(a) * np.eye(len(a))


def _ridge_solve(a: np.ndarray, b: np.ndarray, reg: float) -> np.ndarray:
  import scipy.linalg  # noqa: PLC0415

  return scipy.linalg.cho_solve(scipy.linalg.cho_factor(_ridge(a, reg)), b)
