"""Run by tests/test_sharding.py in a subprocess with N simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`): a few KIP steps (losses, images, labels,
Adam's moments), Label Solve and KRR evaluation on every device of a mesh, for `fc` and `conv`
kernels on small images. Writes every number to an .npz for the test to compare across device
counts.

usage: python tests/sharding_worker.py OUT.npz [--distributed]
  --distributed: one of several processes (jax.distributed.initialize from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID); the mesh spans all of them and process 0 writes OUT.npz.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from kip.kernels import make_kernel, no_params
from kip.krr import evaluate, krr_predict, mse_loss
from kip.method import Batch
from kip.sharding import (
  initialize_distributed,
  make_mesh,
  shard_feature_kernel,
  shard_kernel,
  stream_rows,
)
from methods.kip import make_kip
from methods.label_solve import label_solve

# conv (one 3x3 conv layer, per-pixel variances): a budget of 4 x 2 entries per tile, so each
# device computes several tiles and the gradient recomputes them; fc: everything fits, one tile per
# device. (What the processes share is the mesh and its collectives, whatever the kernel; the
# pooled ConvNet's full covariances, 10 s more to compile per process, are checked tiled and
# differentiated on one process by test_sharded_kernel_and_its_gradients_match_plain_autodiff.)
MEMORY = {"fc": None, "conv": 1e5}
N_SUPPORT, N_TARGET, N_LS, N_TEST, CLASSES = 10, 13, 37, 29, 10


def data(seed: int, n: int, image=(8, 8, 1)):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, *image)).astype(np.float32)
  labels = rng.integers(0, CLASSES, n)
  return x, (np.eye(CLASSES)[labels] - 1 / CLASSES).astype(np.float32), labels


def main(out: str, distributed: bool = False) -> None:
  if distributed:
    initialize_distributed()
  mesh = make_mesh()
  results = {"devices": np.asarray(jax.device_count())}
  x_s, y_s, _ = data(0, N_SUPPORT)
  x_t, y_t, _ = data(1, N_TARGET)
  x_ls, y_ls, _ = data(2, N_LS)
  x_test, _, labels_test = data(3, N_TEST)
  for arch, memory in MEMORY.items():
    kernel = make_kernel(arch)
    step_kernel = shard_kernel(kernel.kernel_fn, kernel.covariance, mesh, memory, backward=True)
    eval_kernel = shard_kernel(kernel.kernel_fn, kernel.covariance, mesh, memory)
    layout = step_kernel.layout(N_TARGET, N_SUPPORT, x_t.shape[1:])
    results[f"{arch}/remat"] = np.asarray(layout.remat)

    # Three KIP steps. The gradients' values show in Adam's moments (an exponential average of
    # the gradients and of their squares: scale included, which Adam's step itself hides); a
    # separate loss-and-gradient program would compile the same kernel twice more.
    method = make_kip(no_params(step_kernel), lr=0.01, learn_labels=True, mesh=mesh)
    state = method.init(jax.random.key(0), x_s, y_s)
    losses = []
    for step in range(3):
      state, metrics = method.update(state, Batch(x_t, y_t), jax.random.key(0), step)
      losses.append(float(metrics["loss"]))
    results[f"{arch}/losses"] = np.asarray(losses)
    results[f"{arch}/x"], results[f"{arch}/y"] = np.asarray(state.x), np.asarray(state.y)
    adam = state.opt_state[0]
    for moment in ("mu", "nu"):
      for i, leaf in enumerate(jax.tree_util.tree_leaves(getattr(adam, moment))):
        results[f"{arch}/adam_{moment}{i}"] = np.asarray(leaf)

    results[f"{arch}/label_solve"] = label_solve(eval_kernel, x_s, x_ls, y_ls)
    results[f"{arch}/k_test"] = np.concatenate(
        [k for _, k in stream_rows(eval_kernel, x_test, jnp.asarray(x_s), 8)])
    metrics = evaluate(eval_kernel, x_s, y_s, x_test, labels_test)
    results[f"{arch}/test_mse"] = np.asarray(metrics["test_mse"])
    results[f"{arch}/test_acc"] = np.asarray(metrics["test_acc"])
  # A neural-feature kernel: images sharded, features gathered, one matmul; chunks of 4 images,
  # so devices hold several chunks (or padding) depending on the device count.
  features = make_kernel("nfk-mlp", width=16, image_shape=x_s.shape[1:])
  params = features.init(jax.random.key(1))
  feature_kernel = shard_feature_kernel(features.features, mesh, chunk_rows=4)

  def feature_loss(x, y):
    with jax.default_matmul_precision("highest"):
      pred = krr_predict(feature_kernel(params, x_t, x), feature_kernel(params, x, x), y)
      return mse_loss(pred, y_t)

  value, grad_x = jax.jit(jax.value_and_grad(feature_loss))(x_s, y_s)
  results["features/k_test"] = np.asarray(jax.jit(feature_kernel)(params, x_test, x_s))
  results["features/loss0"], results["features/grad_x"] = np.asarray(value), np.asarray(grad_x)
  results["features/test_acc"] = np.asarray(evaluate(
      feature_kernel, x_s, y_s, x_test, labels_test, params=params)["test_acc"])
  results["processes"] = np.asarray(jax.process_count())
  if jax.process_index() == 0:
    np.savez(out, **results)


if __name__ == "__main__":
  main(sys.argv[1], "--distributed" in sys.argv[2:])
