"""FRePo and RFAD: their losses against float64 NumPy KRR on the same features, and a resumed
run equal to an uninterrupted one in the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_resumed_equals_straight

from kip.loop import LoopConfig, run
from kip.method import Batch, make_sampler
from methods.frepo import make_frepo
from methods.nets import make_net
from methods.rfad import make_rfad, random_features

RNG = np.random.default_rng(0)
SHAPE, CLASSES = (8, 8, 1), 10
X = RNG.normal(size=(200, *SHAPE)).astype(np.float32)
LABELS = np.arange(200) % CLASSES
Y = (np.eye(CLASSES)[LABELS] - 1 / CLASSES).astype(np.float32)


def numpy_krr(f_t, f_s, y_s, reg):
  f_t, f_s = np.asarray(f_t, np.float64), np.asarray(f_s, np.float64)
  k_ss = f_s @ f_s.T
  k_ss += reg * np.trace(k_ss) / len(k_ss) * np.eye(len(k_ss))
  return f_t @ f_s.T @ np.linalg.solve(k_ss, np.asarray(y_s, np.float64))


def test_frepo_loss_matches_numpy_krr_on_the_pool_features():
  # 10 support images, 32 features: a well-conditioned K_ss for the float32 comparison.
  method = make_frepo(num_classes=CLASSES, image_shape=SHAPE, steps=10, width=8, num_models=2,
                      max_online_updates=4, target_batch=40, augment="")
  state = method.init(jax.random.key(0), X[:10], Y[:10])
  i = int(state.pool.index)
  params = jax.tree_util.tree_map(lambda a: np.asarray(a[i]), state.pool.params)
  stats = jax.tree_util.tree_map(lambda a: np.asarray(a[i]), state.pool.stats)
  net = make_net("frepo_convnet", CLASSES, width=8, norm="batch", image_shape=SHAPE)

  def features(x):
    return net.apply({"params": params, "batch_stats": stats}, x, train=False, features=True)

  x_t, y_t = X[100:140], Y[100:140]
  pred = numpy_krr(features(x_t), features(X[:10]), Y[:10], 1e-6)
  expected = 0.5 * np.mean(np.sum((pred - y_t) ** 2, axis=1))
  # The pool: counters staggered (0, 2), each counting its own model's online updates and
  # wrapping to 0 (re-initialisation) at 4.
  np.testing.assert_array_equal(state.pool.steps, [0, 2])
  state, metrics = method.update(state, Batch(x_t, y_t), jax.random.key(1), 1)  # donates state
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
  assert int(metrics["pool_index"]) == i
  counts = []
  for step in range(2, 12):
    before = int(state.pool.index)
    state, _ = method.update(state, Batch(x_t, y_t), jax.random.key(step), step)
    counts.append(int(state.pool.steps[before]))
  assert all(0 <= c < 4 for c in counts) and 0 in counts

def numpy_rfad_pred(phi_s, phi_t, y_s):
  """RFAD's KRR in float64: K = 2 Phi Phi^T + 0.01, ridge 5e-3 tr(K_ss)/n."""
  phi_s, phi_t = np.asarray(phi_s, np.float64), np.asarray(phi_t, np.float64)
  k_ss = 2 * phi_s @ phi_s.T + 0.01
  k_ss += 5e-3 * np.trace(k_ss) / len(k_ss) * np.eye(len(k_ss))
  return (2 * phi_t @ phi_s.T + 0.01) @ np.linalg.solve(k_ss, np.asarray(y_s, np.float64))


def test_rfad_loss_matches_numpy_on_the_same_random_features():
  # The 40 target images' features in chunks of 16 (one net at a time, the last chunk padded),
  # the reference's all at once.
  method = make_rfad(num_classes=CLASSES, image_shape=SHAPE, width=4, num_models=2,
                     target_batch=40, target_chunk=16)
  state = method.init(jax.random.key(0), X[:20], Y[:20])
  key = jax.random.key(3)
  features = random_features(CLASSES, SHAPE, width=4, num_models=2)
  phi_s = np.asarray(features(key, jnp.asarray(X[:20])), np.float64)
  phi_t = np.asarray(features(key, jnp.asarray(X[100:140])), np.float64)
  pred = numpy_rfad_pred(phi_s, phi_t, Y[:20])
  expected = 0.5 * np.mean((pred - Y[100:140]) ** 2)
  _, metrics = method.update(state, Batch(X[100:140], Y[100:140]), key, 1)
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
  # One random net's features are the flattened conv output scaled by 1/sqrt(models * D).
  assert phi_s.shape == (20, 2 * 4)  # 8x8 -> 4 -> 2 -> 1: 1 x 1 x 4 per net


@pytest.mark.parametrize("over_models", ["vmap", "map", "unroll"])
def test_rfad_features_are_each_nets_own_whatever_the_batching(over_models):
  """Each way of running the nets (vmap: grouped convolutions; map: a compiled loop; unroll)
  gives, net by net, the features of that net built and applied alone with the key `split`
  gives it, and their gradient in the images."""
  import chex  # noqa: PLC0415

  from kip.nets import make_net as kip_net  # noqa: PLC0415

  net = kip_net("convnet3", CLASSES, width=4, norm="none", image_shape=SHAPE)
  key, x = jax.random.key(6), jnp.asarray(X[:12])

  def reference(x):
    phis = [net.apply(net.init(k, jnp.zeros((1, *SHAPE)), train=False), x, train=False,
                      features=True) for k in jax.random.split(key, 3)]
    return jnp.concatenate(phis, -1) / jnp.sqrt(3.0 * phis[0].shape[-1])

  features = random_features(CLASSES, SHAPE, width=4, num_models=3, over_models=over_models)
  chex.assert_trees_all_close(features(key, x), reference(x), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.grad(lambda x: jnp.sum(features(key, x) ** 2))(x),
                              jax.grad(lambda x: jnp.sum(reference(x) ** 2))(x),
                              rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="over_models"):
    random_features(CLASSES, SHAPE, width=4, num_models=3, over_models="pmap")


def test_rfad_platt_loss_is_the_cross_entropy_of_the_scaled_prediction():
  method = make_rfad(num_classes=CLASSES, image_shape=SHAPE, width=4, num_models=1,
                     target_batch=40, platt=True)
  state = method.init(jax.random.key(0), X[:20], Y[:20])
  key = jax.random.key(4)
  phi = random_features(CLASSES, SHAPE, width=4, num_models=1)
  phi_s = np.asarray(phi(key, jnp.asarray(X[:20])), np.float64)
  phi_t = np.asarray(phi(key, jnp.asarray(X[100:140])), np.float64)
  logits = numpy_rfad_pred(phi_s, phi_t, Y[:20])
  logits -= logits.max(1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  expected = -np.mean(log_p[np.arange(40), LABELS[100:140]])  # scale exp(0) = 1 at init
  state, metrics = method.update(state, Batch(X[100:140], Y[100:140]), key, 1)
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
  assert float(state.log_scale) != 0.0  # the scale is learned


def test_rfad_official_pixel_map_is_applied_learned_and_exported():
  """With the official code's learned pixel map, the kernel sees `x_flat @ T`: the loss at a
  random T matches float64 NumPy on the mapped images; AdaBelief's first step moves each entry of
  T by lr / 0.9 (its bias-corrected closed form: g / |0.9 g|) or not at all; the exported set is
  the mapped images."""
  lr = 5e-5
  method = make_rfad(num_classes=CLASSES, image_shape=SHAPE, width=4, num_models=2,
                     target_batch=40, transform_lr=lr)
  state = method.init(jax.random.key(0), X[:20], Y[:20])
  np.testing.assert_array_equal(state.transform, np.eye(64))
  t0 = np.eye(64) + 0.1 * RNG.normal(size=(64, 64))
  state = state._replace(transform=jnp.asarray(t0, jnp.float32))
  key = jax.random.key(5)
  features = random_features(CLASSES, SHAPE, width=4, num_models=2)
  mapped = (X[:20].reshape(20, -1).astype(np.float64) @ t0).reshape(X[:20].shape)
  phi_s = np.asarray(features(key, jnp.asarray(mapped, jnp.float32)), np.float64)
  phi_t = np.asarray(features(key, jnp.asarray(X[100:140])), np.float64)
  expected = 0.5 * np.mean((numpy_rfad_pred(phi_s, phi_t, Y[:20]) - Y[100:140]) ** 2)
  state, metrics = method.update(state, Batch(X[100:140], Y[100:140]), key, 1)
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-3)
  # T is float32 (entries up to ~1.4: a rounding of 1.2e-7), the step lr / 0.9 = 5.6e-5, less
  # where |g| is so small that AdaBelief's eps_root (1e-16 / (1 - b2)) counts.
  moved = np.abs(np.asarray(state.transform, np.float64) - t0)
  assert moved.max() < lr / 0.9 + 2e-7
  assert np.mean(np.abs(moved - lr / 0.9) < 2e-7) > 0.99
  exported = method.export(state)["images"]
  np.testing.assert_allclose(
      exported, (np.asarray(state.x).reshape(20, -1) @ np.asarray(state.transform, np.float64))
      .reshape(X[:20].shape), rtol=1e-4, atol=1e-5)


def _method(name):
  if name == "frepo":
    return make_frepo(num_classes=CLASSES, image_shape=SHAPE, steps=8, width=4, num_models=2,
                      max_online_updates=4, target_batch=20)
  return make_rfad(num_classes=CLASSES, image_shape=SHAPE, width=4, num_models=2,
                   target_batch=20, platt=True, transform_lr=5e-5 if name == "rfad_map" else 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["frepo", "rfad", "rfad_map"])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, name):
  config = LoopConfig(steps=8, eval_every=0, checkpoint_every=3, seed=1)
  method = _method(name)

  def go(folder, m):
    return run(m, workdir=str(tmp_path / folder), config=config,
               sampler=make_sampler(m.data, X, LABELS, Y, seed=1), x_init=X[:10], y_init=Y[:10],
               log=lambda _: None, progress=False)

  assert_resumed_equals_straight(go, method, after=4)
