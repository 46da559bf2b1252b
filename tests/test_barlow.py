"""Barlow Twins, the KRR-ST teacher: its loss against the NumPy formula, the view augmentations
against closed forms, the teacher file's round trip, and a resumed teacher run equal to an
uninterrupted one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_resumed_equals_straight

from kip.augment import random_crop
from kip.loop import LoopConfig, run
from kip.method import make_sampler
from kip.train import linear_probe
from methods.barlow import (
  barlow_twins_loss,
  load_teacher,
  make_barlow_twins,
  random_resized_crop,
  save_teacher,
  two_views,
)

RNG = np.random.default_rng(0)


def numpy_barlow_twins(z1, z2, lambd):
  z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
  n, d = z1.shape
  a = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + 1e-5)
  b = (z2 - z2.mean(0)) / np.sqrt(z2.var(0) + 1e-5)
  c = np.einsum("ni,nj->ij", a, b) / n
  total = 0.0
  for i in range(d):
    for j in range(d):
      total += (1 - c[i, j]) ** 2 if i == j else lambd * c[i, j] ** 2
  return total


def test_barlow_twins_loss_matches_the_numpy_formula():
  z1 = RNG.normal(size=(32, 6)).astype(np.float32)
  z2 = (z1 + 0.5 * RNG.normal(size=(32, 6))).astype(np.float32)
  for lambd in (0.0051, 0.5):
    assert float(barlow_twins_loss(z1, z2, lambd)) == pytest.approx(
        numpy_barlow_twins(z1, z2, lambd), rel=1e-5)
  # Identical views with zero-mean orthonormal columns (variance 1/64): c = I / (1 + 64 eps), so
  # only the diagonal's eps shortfall remains.
  z = RNG.normal(size=(64, 4))
  q, _ = np.linalg.qr(z - z.mean(0))
  expected = 4 * (1 - 1 / (1 + 64e-5)) ** 2
  assert float(barlow_twins_loss(q.astype(np.float32), q.astype(np.float32))) == pytest.approx(
      expected, rel=1e-2)


def test_view_augmentations_against_closed_forms():
  x = jnp.asarray(RNG.uniform(size=(3, 12, 12, 1)), jnp.float32)
  # The whole image at aspect 1 is the identity (bilinear resampling at the pixel centres).
  same = random_resized_crop(jax.random.key(0), x, min_scale=1.0, ratio=(1.0, 1.0))
  np.testing.assert_allclose(same, x, atol=1e-6)
  # Every view stays in [0, 1]; a constant image stays constant through crop, blur and jitter's
  # brightness only up to the clip (contrast about the mean leaves it unchanged).
  v1, v2 = two_views(jax.random.key(1), x)
  assert v1.shape == v2.shape == x.shape
  assert float(v1.min()) >= 0 and float(v1.max()) <= 1 and not np.allclose(v1, v2)
  flat = jnp.full((2, 12, 12, 1), 0.25)
  c1, _ = two_views(jax.random.key(2), flat, "crop_blur")
  np.testing.assert_allclose(c1, flat, atol=1e-6)
  # Solarisation in the second view: x -> 1 - x above 0.5, with probability 0.2 per image.
  bright = jnp.full((400, 2, 2, 1), 0.75)
  _, s2 = two_views(jax.random.key(3), bright, "solarize")
  values = np.unique(np.round(np.asarray(s2), 6))
  assert set(values) == {0.25, 0.75}
  assert 0.13 < float(np.mean(np.asarray(s2)[:, 0, 0, 0] == 0.25)) < 0.27


def test_random_crop_is_a_padded_shift():
  x = jnp.asarray(np.arange(2 * 6 * 6, dtype=np.float32).reshape(2, 6, 6, 1))
  out = np.asarray(random_crop(jax.random.key(0), x, pad=2, fill=-1.0))
  for image, crop in zip(np.asarray(x), out, strict=True):
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), constant_values=-1.0)
    windows = [padded[r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
    assert any(np.array_equal(crop, w) for w in windows)


def _tiny_barlow(steps=6):
  # An MLP backbone: the loop and the file do not depend on the backbone, and it compiles in a
  # fraction of ResNet-18's time (the command's test trains the real ResNet-18 teacher).
  return make_barlow_twins(image_shape=(12, 12, 1), mean=np.array([0.5]), std=np.array([0.25]),
                           steps=steps, batch=16, backbone="mlp", width=8, projector=(8, 8),
                           optimizer="adamw", lr=1e-2, warmup_steps=2)


X = RNG.normal(size=(64, 12, 12, 1)).astype(np.float32)


@pytest.mark.slow
def test_a_resumed_teacher_run_equals_an_uninterrupted_one_and_the_file_round_trips(tmp_path):
  method, _ = _tiny_barlow()
  config = LoopConfig(steps=6, eval_every=0, checkpoint_every=2, seed=3)

  def go(folder, m):
    return run(m, workdir=str(tmp_path / folder), config=config,
               sampler=make_sampler(m.data, X, seed=3), log=lambda _: None, progress=False)

  straight, _ = assert_resumed_equals_straight(go, method, after=3)

  path = str(tmp_path / "teacher.msgpack")
  save_teacher(path, straight.state, {"backbone": "mlp", "width": 8, "projector": "8-8",
                                      "image_shape": [12, 12, 1], "dataset": "toy"})
  teacher = load_teacher(path)
  assert teacher.dim == 8 and teacher.config["dataset"] == "toy"  # the MLP's hidden width
  _, model = _tiny_barlow()
  expected = model.apply({"params": straight.state.params,
                          "batch_stats": straight.state.batch_stats}, X[:5], features=True)
  np.testing.assert_allclose(teacher.features(X[:5]), expected, rtol=1e-5, atol=1e-6)


def test_linear_probe_separates_linearly_separable_features():
  labels = np.arange(300) % 3
  centres = RNG.normal(size=(3, 5)) * 4
  f = centres[labels] + RNG.normal(size=(300, 5))
  assert linear_probe(f[:200], labels[:200], f[200:], labels[200:], steps=200) > 0.95
  noise = RNG.normal(size=(300, 5))
  assert linear_probe(noise[:200], labels[:200], noise[200:], labels[200:], steps=200) < 0.6
