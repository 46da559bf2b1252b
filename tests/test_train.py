"""Training protocols: the NTK learning rate against an explicit-Jacobian NumPy computation and
against simulated linearised dynamics, schedules, vmapped seeds equal to separate runs, exact
resume, and both protocols learning real MNIST at a tiny size."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from kip.data import centered_one_hot, class_balanced_indices
from kip.loop import NonFiniteLossError
from kip.nets import make_net
from kip.train import max_stable_lr, resolve_schedule, train_and_evaluate
from methods.protocols import PROTOCOLS


def explicit_ntk(net, variables, x):
  """(n*k, n*k) float64 NTK from the full Jacobian of the flattened parameters."""
  flat, unravel = ravel_pytree(variables["params"])

  def f(theta):
    return net.apply({"params": unravel(theta)}, x).ravel()

  with jax.default_matmul_precision("highest"):
    jac = np.asarray(jax.jacrev(f)(flat), np.float64)
  return jac @ jac.T


def test_max_stable_lr_matches_numpy_and_is_the_stability_edge():
  net = make_net("mlp", 3, width=16)
  x = np.random.default_rng(0).standard_normal((6, 4, 4, 1)).astype(np.float32)
  variables = net.init(jax.random.key(0), x)
  lr = max_stable_lr(net, variables, x, momentum=0.9)
  full = explicit_ntk(net, variables, x)  # (18, 18), logits interleaved per image
  n, k = 6, 3
  per_logit_mean = full.reshape(n, k, n, k).trace(axis1=1, axis2=3) / k
  expected = 2 * 1.9 * n * k / np.linalg.eigvalsh(per_logit_mean)[-1]
  assert lr == pytest.approx(expected, rel=1e-4)
  # Room for one logit's Jacobian only: the NTK summed logit by logit, as exact.
  one_logit = 4 * n * sum(v.size for v in jax.tree_util.tree_leaves(variables["params"]))
  messages = []
  by_logit = max_stable_lr(net, variables, x, momentum=0.9, memory_bytes=1.5 * one_logit,
                           log=messages.append)
  assert "one logit's Jacobian at a time" in messages[0]
  assert by_logit == pytest.approx(expected, rel=1e-4)
  # Without room for the Jacobian: power iteration with NTK-vector products, same rate.
  matrix_free = max_stable_lr(net, variables, x, momentum=0.9, memory_bytes=0, iterations=500)
  assert matrix_free == pytest.approx(expected, rel=1e-3)

  # Heavy-ball GD on the linearised MSE 0.5 * mean(r^2) with the logit-averaged kernel
  # (block diagonal over logits): r <- r - lr / (n k) * K r + momentum; stable just below.
  kernel = np.kron(per_logit_mean, np.eye(k))
  r0 = np.random.default_rng(1).standard_normal(n * k)

  def final_residual(rate):
    r, velocity = r0.copy(), np.zeros_like(r0)
    for _ in range(1000):
      velocity = 0.9 * velocity + kernel @ r / (n * k)
      r = r - rate * velocity
    return np.linalg.norm(r)

  assert final_residual(0.95 * lr) < np.linalg.norm(r0)
  assert final_residual(1.05 * lr) > 1e3 * np.linalg.norm(r0)


def test_the_matrix_free_learning_rate_captures_no_activations_as_constants():
  """The NTK-vector product is jitted with the parameters and images as arguments: closing over a
  VJP taken outside would make its activations (here 50 x 28 x 28 x 32 floats a layer, 5 MB
  each) constants of the program (2.11 GB at the colab's width 1024). The suite turns JAX's
  warning into an error above 10 MB (conftest); this one asks for 1 MB."""
  net = make_net("convnet", 10, width=32)
  x = np.random.default_rng(0).standard_normal((50, 28, 28, 1)).astype(np.float32)
  variables = net.init(jax.random.key(0), x[:1])
  before = jax.config.jax_captured_constants_warn_bytes
  jax.config.update("jax_captured_constants_warn_bytes", 2**20)
  try:
    lr = max_stable_lr(net, variables, x, momentum=0.9, memory_bytes=0, iterations=1)
  finally:
    jax.config.update("jax_captured_constants_warn_bytes", before)
  assert np.isfinite(lr) and lr > 0


def test_schedules_follow_the_protocols():
  dc, dsa, kip = PROTOCOLS["dc"], PROTOCOLS["dsa"], PROTOCOLS["kip"]
  # DC: its own augmentation on MNIST only, then 1000 epochs; otherwise none and 300 epochs.
  assert resolve_schedule(dc, 100, dataset="mnist") == (1000, 100, 1, "dc:crop_scale_rotate")
  assert resolve_schedule(dc, 100, dataset="cifar10") == (300, 100, 1, "")
  assert resolve_schedule(dc, 100, dataset="mnist", augment="none").steps == 300
  # DSA/DM/MTT: DSA on every dataset, 1000 epochs.
  assert resolve_schedule(dsa, 100, dataset="cifar10") == (1000, 100, 1, dsa.augment)
  assert resolve_schedule(dsa, 100, augment="none").steps == 300
  # The last batch of an epoch is kept (PyTorch's DataLoader): ceil(60000 / 256) = 235 steps.
  assert resolve_schedule(dsa, 60000, augment="none") == (300 * 235, 256, 235, "")
  assert resolve_schedule(kip, 100) == (5000, 100, 1, "")
  assert resolve_schedule(kip, 150) == (5000, 100, 1, "")  # kip drops the partial batch
  assert resolve_schedule(kip, 100, steps=7).steps == 7
  with pytest.raises(ValueError, match="unknown augmentation"):
    resolve_schedule(dsa, 100, augment="blur")


@pytest.fixture(scope="module")
def small(mnist):
  """20 real training images per class and 1000 test images, standardised."""
  from kip.data import fit_preprocessor

  pre = fit_preprocessor(mnist["train"].images)
  idx = class_balanced_indices(mnist["train"].labels, 20, np.random.default_rng(0), 10)
  x = pre.apply(mnist["train"].images[idx])
  y = centered_one_hot(mnist["train"].labels[idx], 10)
  return x, y, pre.apply(mnist["test"].images[:1000]), mnist["test"].labels[:1000]


@pytest.mark.slow
def test_kip_protocol_learns_real_mnist(small):
  x, y, x_test, labels_test = small
  # At the edge-of-stability rate a narrow net (width 64) can lose all its ReLUs in the first
  # steps; the protocol's nets are wide (1024), and 256 is enough here.
  net = make_net("mlp", 10, width=256)
  result = train_and_evaluate(net, PROTOCOLS["kip"], x, y, x_test, labels_test, seeds=[0, 1],
                              steps=150, eval_every=50, progress=False, log=lambda s: None)
  assert result.test_acc.shape == (2,)
  assert result.test_acc.min() > 0.6  # chance is 0.1; measured ~0.7
  assert [c["step"] for c in result.curve] == [0, 50, 100, 150]
  assert result.curve[0]["test_acc_mean"] < 0.3 < result.curve[-1]["test_acc_mean"]
  assert result.images_per_s > 0


@pytest.mark.slow
def test_dc_protocol_with_augmentation_learns_real_mnist(small):
  x, y, x_test, labels_test = small
  protocol = PROTOCOLS["dc"]
  net = make_net("convnet3", 10, width=16, norm="instance", image_shape=(28, 28, 1),
                 dc_padding=True)
  result = train_and_evaluate(net, protocol, x, y, x_test, labels_test, seeds=[0], steps=80,
                              lr=0.05, dataset="mnist", progress=False, log=lambda s: None)
  assert result.lr == 0.05 and result.steps == 80
  assert result.test_acc[0] > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("seed_batching", ["vmap", "sequential"])
def test_seeds_trained_together_equal_separate_runs(small, seed_batching):
  x, y, x_test, labels_test = small
  net = make_net("convnet3", 10, width=8)
  kwargs = dict(steps=30, lr=0.05, eval_every=10, progress=False, log=lambda s: None)
  both = train_and_evaluate(net, PROTOCOLS["kip"], x, y, x_test, labels_test, seeds=[3, 4],
                            seed_batching=seed_batching, **kwargs)
  alone = train_and_evaluate(net, PROTOCOLS["kip"], x, y, x_test, labels_test, seeds=[4],
                             **kwargs)
  for a, b in zip(both.curve, alone.curve, strict=True):
    assert a["test_acc"][1] == pytest.approx(b["test_acc"][0], abs=2e-3)
    if "loss" in a:
      assert a["loss"][1] == pytest.approx(b["loss"][0], rel=1e-4)


@pytest.mark.slow
def test_per_seed_training_sets(small):
  x, y, x_test, labels_test = small
  net = make_net("mlp", 10, width=32)
  kwargs = dict(steps=20, lr=0.05, eval_every=10, progress=False, log=lambda s: None)
  order = np.random.default_rng(0).permutation(len(x))
  stacked = train_and_evaluate(net, PROTOCOLS["kip"], np.stack([x, x[order]]),
                               np.stack([y, y[order]]), x_test, labels_test, seeds=[0, 0],
                               **kwargs)
  # Each seed trains on its own set, exactly as if trained alone on it.
  for i, (images, labels) in enumerate([(x, y), (x[order], y[order])]):
    alone = train_and_evaluate(net, PROTOCOLS["kip"], images, labels, x_test, labels_test,
                               seeds=[0], **kwargs)
    assert stacked.curve[-1]["loss"][i] == pytest.approx(alone.curve[-1]["loss"][0], rel=1e-4)
  assert stacked.curve[-1]["loss"][0] != stacked.curve[-1]["loss"][1]
  with pytest.raises(ValueError, match="one training set per seed"):
    train_and_evaluate(net, PROTOCOLS["kip"], np.stack([x, x]), np.stack([y, y]), x_test,
                       labels_test, seeds=[0], **kwargs)


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(small, tmp_path):
  x, y, x_test, labels_test = small
  net = make_net("mlp", 10, width=32)
  protocol = dataclasses.replace(PROTOCOLS["dc"], batch_size=50)  # 4 batches an epoch
  kwargs = dict(seeds=[0, 1], steps=40, eval_every=10, progress=False, log=lambda s: None,
                augment="flip_crop")
  straight = train_and_evaluate(net, protocol, x, y, x_test, labels_test, **kwargs)
  train_and_evaluate(net, protocol, x, y, x_test, labels_test, workdir=str(tmp_path), **kwargs)
  # Lose the last checkpoint (step 40) as if killed after step 30's checkpoint, then re-run.
  os.remove(tmp_path / "checkpoints" / "ckpt_00000040.npz")
  resumed = train_and_evaluate(net, protocol, x, y, x_test, labels_test, workdir=str(tmp_path),
                               **kwargs)
  np.testing.assert_array_equal(resumed.test_acc, straight.test_acc)
  assert [c["step"] for c in resumed.curve] == [0, 10, 20, 30, 40]
  assert [c["test_acc"] for c in resumed.curve] == [c["test_acc"] for c in straight.curve]


@pytest.mark.slow
def test_rfad_protocol_centres_the_output_and_learns(small):
  x, y, x_test, labels_test = small
  net = make_net("mlp", 10, width=64)
  protocol = PROTOCOLS["rfad"]
  result = train_and_evaluate(net, protocol, x, y, x_test, labels_test, seeds=[0], steps=60,
                              eval_every=60, progress=False, log=lambda s: None)
  # Centred: the network's output at initialisation is exactly 0, so the first loss is
  # 0.5 * mean((0 - 8 y)^2) / 8^2 = 0.5 * mean(y^2), and the decay toward init adds nothing yet.
  # (The first loss record is the loss of step 1, taken at the initial weights.)
  assert result.curve[0]["test_acc"][0] == pytest.approx(np.mean(labels_test == 0), abs=1e-9)
  assert result.test_acc[0] > 0.6


def test_divergence_stops_with_a_clear_error(small):
  x, y, x_test, labels_test = small
  net = make_net("mlp", 10, width=16)
  with pytest.raises(NonFiniteLossError, match="lower --lr"):
    train_and_evaluate(net, PROTOCOLS["kip"], x * 1e3, y, x_test, labels_test, steps=50,
                       lr=1e3, progress=False, log=lambda s: None)
