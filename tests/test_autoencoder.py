"""Autoencoder-based unsupervised distillation: the model (untied and tied) and the four loss terms
against float64 NumPy, the second-order penalty's gradient against finite differences, the weight
schedules, the homogeneity figure, a resumed phase 2 equal to an uninterrupted one, and the command
end to end on real MNIST at a tiny size."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_resumed_equals_straight

from kip.io import load_distilled
from kip.loop import LoopConfig, read_metrics, run
from kip.method import make_sampler
from methods.autoencoder import (
  SCHEDULES,
  Autoencoder,
  LossWeights,
  distillation_loss,
  make_autoencoder_distillation,
  make_autoencoder_training,
  mean_pairwise_distance,
  params_from_extras,
  reconstruction_error,
)

RNG = np.random.default_rng(0)
DIM, HIDDEN, CLASSES = 12, 5, 3


def _params(tied: bool):
  model = Autoencoder(DIM, HIDDEN, CLASSES, tied)
  return model, model.init(jax.random.key(1), jnp.zeros((1, DIM)))["params"]


def _numpy_terms(p, d, x, labels, tied, reconstruct="synthetic", reduction="mean"):
  """The four terms in float64 NumPy, with g = dR/dD written out by hand (chain rule through the
  sigmoid decoder and ReLU encoder)."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  w_dec = p["w_enc"].T if tied else p["w_dec"]
  reduce = np.mean if reduction == "mean" else np.sum

  def forward(v):
    pre = v @ p["w_enc"] + p["b_enc"]
    h = np.maximum(pre, 0)
    out = 1 / (1 + np.exp(-(h @ w_dec + p["b_dec"])))
    return pre, h, out

  both = d if reconstruct == "synthetic" else np.concatenate([d, x])
  pre, h, out = forward(both)
  rec = reduce((out - both) ** 2)
  scale = 1 / both.size if reduction == "mean" else 1.0
  dout = 2 * (out - both) * scale  # dR/d(out)
  dlogit = dout * out * (1 - out)
  dh = dlogit @ w_dec.T
  dpre = dh * (pre > 0)
  g_both = dpre @ p["w_enc"].T - dout  # through the encoder, and R's direct dependence on D
  g = g_both[:len(d)]
  a = np.abs(g)
  gp = reduce(np.where(a < 1, 0.5 * g * g, a - 0.5))
  div = reduce(np.sum((d - d.mean(0)) ** 2, axis=1))
  logits = forward(x)[1] @ p["w_head"] + p["b_head"]
  logits = logits - logits.max(1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  cls = -np.mean(logp[np.arange(len(x)), labels])
  return {"cls": cls, "rec": rec, "gp": gp, "div": div}


@pytest.mark.parametrize("tied, reconstruct, reduction", [
    (False, "synthetic", "mean"), (True, "synthetic", "mean"), (False, "both", "sum")])
def test_the_four_terms_match_float64_numpy(tied, reconstruct, reduction):
  model, params = _params(tied)
  d = RNG.uniform(0, 1, (4, DIM)).astype(np.float32)
  x = RNG.uniform(0, 1, (6, DIM)).astype(np.float32)
  labels = np.arange(6) % CLASSES
  weights = LossWeights(cls=1.0, rec=5.0, gp=100.0, div=1.0)
  loss, terms = distillation_loss(model, params, jnp.asarray(d), jnp.asarray(x),
                                  jnp.asarray(labels), weights, 0.5, 0.25,
                                  reconstruct=reconstruct, reduction=reduction)
  ref = _numpy_terms(params, d.astype(np.float64), x.astype(np.float64), labels, tied,
                     reconstruct, reduction)
  for name in ("cls", "rec", "div"):
    np.testing.assert_allclose(float(terms[name]), ref[name], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(float(terms["gp"]), ref["gp"], rtol=1e-4)
  expected = ref["cls"] + 100 * ref["gp"] + 0.5 * 5 * ref["rec"] - 0.25 * ref["div"]
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_the_second_order_penalty_gradient_matches_finite_differences():
  """d(penalty)/dD and d(penalty)/dW differentiate through dR/dD; float64 central differences.
  The sum reduction keeps g large enough that SmoothL1 is in both its regimes."""
  with jax.enable_x64(True):
    model, params = _params(tied=False)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) * 3, params)
    d = jnp.asarray(RNG.uniform(0, 1, (3, DIM)))
    x = jnp.asarray(RNG.uniform(0, 1, (2, DIM)))
    labels = jnp.asarray([0, 1])
    only_gp = LossWeights(cls=0.0, rec=0.0, gp=1.0, div=0.0)

    @jax.jit
    def penalty(p, d_):
      return distillation_loss(model, p, d_, x, labels, only_gp, 1.0, 1.0, reduction="sum")[0]

    g = jax.grad(lambda d_: reconstruction_error(model, params, d_, "sum"))(d)
    assert np.any(np.abs(g) < 1) and np.any(np.abs(g) > 1)  # both of SmoothL1's regimes
    grad_p, grad_d = jax.grad(penalty, argnums=(0, 1))(params, d)
    eps = 1e-6
    for i, j in [(0, 0), (1, 5), (2, 11)]:
      e = jnp.zeros_like(d).at[i, j].set(eps)
      numeric = (penalty(params, d + e) - penalty(params, d - e)) / (2 * eps)
      np.testing.assert_allclose(float(grad_d[i, j]), float(numeric), rtol=1e-6, atol=1e-9)
    for name, index in [("w_enc", (3, 2)), ("w_dec", (1, 7)), ("b_dec", (4,))]:
      e = jnp.zeros_like(params[name]).at[index].set(eps)
      plus = penalty({**params, name: params[name] + e}, d)
      minus = penalty({**params, name: params[name] - e}, d)
      np.testing.assert_allclose(float(grad_p[name][index]), float((plus - minus) / (2 * eps)),
                                 rtol=1e-6, atol=1e-9)


def test_the_weight_schedules():
  weights, ramp = SCHEDULES["report"]
  assert weights == LossWeights(cls=1, rec=5, gp=100, div=1)
  for epoch, (w_rec, w_div) in [(0, (1 / 50, 1 / 30)), (14, (15 / 50, 15 / 30)),
                                (29, (30 / 50, 1.0)), (49, (1.0, 1.0)), (200, (1.0, 1.0))]:
    np.testing.assert_allclose(np.asarray(ramp(jnp.float32(epoch))), (w_rec, w_div), rtol=1e-6)
  weights, decay = SCHEDULES["code"]
  assert weights.rec == 1
  np.testing.assert_allclose([float(decay(jnp.float32(e))[0]) for e in (0, 50, 100, 150)],
                             [1.0, 10 ** -1.5, 1e-3, 1e-3], rtol=1e-5)


def test_mean_pairwise_distance_is_the_mean_over_distinct_pairs():
  x = RNG.normal(size=(7, 3, 2))
  flat = x.reshape(7, -1)
  distances = [np.linalg.norm(flat[i] - flat[j]) for i in range(7) for j in range(7) if i != j]
  np.testing.assert_allclose(mean_pairwise_distance(x), np.mean(distances), rtol=1e-5)
  assert mean_pairwise_distance(np.ones((5, 4))) == pytest.approx(0.0, abs=1e-3)


def test_a_resumed_phase_two_equals_an_uninterrupted_one(tmp_path):
  model, params = _params(tied=True)
  x = RNG.uniform(0, 1, (40, 3, 4, 1)).astype(np.float32)
  labels = np.arange(40) % CLASSES
  y = np.eye(CLASSES, dtype=np.float32)[labels]
  method = make_autoencoder_distillation(image_shape=(3, 4, 1), params=params, steps_per_epoch=2,
                                         hidden=HIDDEN, num_classes=CLASSES, tied=True, batch=6,
                                         lr=1e-2)
  config = LoopConfig(steps=6, eval_every=0, checkpoint_every=2, seed=3)

  def go(folder, m):
    return run(m, workdir=str(tmp_path / folder), config=config,
               sampler=make_sampler(m.data, x, labels, y, seed=3), x_init=x[:4],
               log=lambda _: None, progress=False)

  straight, _ = assert_resumed_equals_straight(go, method, after=3)
  exported = method.export(straight.state)
  assert not np.allclose(np.asarray(exported["images"]), x[:4])
  np.testing.assert_allclose(np.asarray(exported["targets"]).sum(-1), 1.0, rtol=1e-5)
  restored = params_from_extras({k: np.asarray(v) for k, v in exported.items()})
  assert set(restored) == set(params) and not np.allclose(restored["w_enc"], params["w_enc"])


def test_phase_one_trains_the_autoencoder_leaves_the_head_and_resumes_exactly(tmp_path):
  x = RNG.uniform(0, 1, (40, 3, 4, 1)).astype(np.float32)
  method = make_autoencoder_training(image_shape=(3, 4, 1), hidden=HIDDEN, num_classes=CLASSES,
                                     batch=8, lr=1e-2)
  config = LoopConfig(steps=6, eval_every=0, checkpoint_every=2, seed=5)

  def go(folder, m):
    return run(m, workdir=str(tmp_path / folder), config=config,
               sampler=make_sampler(m.data, x, seed=5), log=lambda _: None, progress=False)

  straight, _ = assert_resumed_equals_straight(go, method, after=3)
  # The loop's init key is fold_in(key(seed), 0).
  start = Autoencoder(12, HIDDEN, CLASSES).init(jax.random.fold_in(jax.random.key(5), 0),
                                                 jnp.zeros((1, 12)))["params"]
  trained = straight.state.params
  for name in ("w_head", "b_head"):
    np.testing.assert_array_equal(np.asarray(trained[name]), np.asarray(start[name]))
  assert not np.allclose(np.asarray(trained["w_enc"]), np.asarray(start["w_enc"]))


@pytest.mark.slow
def test_the_command_on_real_mnist(tmp_path, run_in_process, manual_dir, data_dir):
  workdir = tmp_path / "ae"
  args = ["--dataset", "mnist", "--samples", "20", "--batch", "2000", "--pretrain-epochs", "2",
          "--epochs", "2", "--lr", "0.01", "--worth-steps", "20", "--probe-steps", "20",
          "--probe-seeds", "1", "--workdir", str(workdir), "--manual-dir", manual_dir,
          "--data-dir", data_dir, "--no-progress"]
  first = run_in_process("experiments.autoencoder", *args)
  assert first.returncode == 0, first.stderr
  assert "pre-trained on the samples" in first.stdout
  phase1 = [r["step"] for r in read_metrics(workdir / "autoencoder" / "metrics.jsonl")
            if "validation_loss" in r]
  assert phase1 == [27, 54]  # ceil(54000 / 2000) steps per epoch
  phase2 = [r for r in read_metrics(workdir / "metrics.jsonl") if "validation_acc" in r]
  assert [r["step"] for r in phase2] == [0, 27, 54]
  assert phase2[-1]["validation_acc"] > 0.5  # the head, trained on real data
  best = load_distilled(str(workdir / "distilled_best.npz"))
  assert best.images.shape == (20, 28, 28, 1) and best.targets.shape == (20, 10)
  report = json.loads((workdir / "worth.json").read_text())
  assert [r["row"] for r in report["rows"]] == ["distilled", "random", "none", "real"]
  assert all(0 < r["probe_acc_mean"] <= 1 for r in report["rows"])
  for picture in ("reconstructions", "samples", "curves", "confusion"):
    assert (workdir / f"{picture}.png").stat().st_size > 1000
  again = run_in_process("experiments.autoencoder", *args)
  assert again.returncode == 0 and again.stderr.count("resuming from step 54") == 2
  assert json.loads((workdir / "worth.json").read_text())["rows"] == report["rows"]
