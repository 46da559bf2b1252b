"""The `dc` and `dsa` transfer protocols against the official code they reproduce
(VICO-UoE/DatasetCondensation `main.py`, `main_DM.py`, `utils.py`;
GeorgeCazenavette/mtt-distillation `distill.py`, `utils.py`), and that training augments as each
protocol says."""

import dataclasses

import jax
import numpy as np
import pytest

import kip.train
from kip.augment import DSA_STRATEGY
from kip.data import centered_one_hot
from kip.nets import make_net
from kip.train import resolve_schedule, train_and_evaluate
from methods.protocols import PROTOCOLS


def test_dc_and_dsa_optimise_as_the_official_sgd():
  # utils.evaluate_synset: torch.optim.SGD(lr_net=0.01, momentum=0.9, weight_decay=0.0005), the
  # rate x0.1 at half of the epochs. PyTorch's rule, in float64 NumPy:
  #   g <- g + wd * w;  b <- momentum * b + g (b = g on the first step);  w <- w - lr_t * b
  steps, rng = 10, np.random.default_rng(0)
  w0 = rng.normal(size=5)
  grads = rng.normal(size=(steps, 5))
  w, b = w0.copy(), None
  for t in range(steps):
    g = grads[t] + 5e-4 * w
    b = g if b is None else 0.9 * b + g
    w = w - (0.01 if t < steps // 2 else 0.001) * b
  for name in ("dc", "dsa"):
    tx = kip.train.make_optimizer(PROTOCOLS[name], PROTOCOLS[name].lr, steps)
    params = jax.numpy.asarray(w0, jax.numpy.float32)
    opt_state = tx.init(params)
    for t in range(steps):
      updates, opt_state = tx.update(jax.numpy.asarray(grads[t], jax.numpy.float32), opt_state,
                                     params)
      params = params + updates
    np.testing.assert_allclose(params, w, rtol=1e-5, atol=1e-6)


def test_dc_augments_mnist_only_and_dsa_every_dataset():
  dc, dsa = PROTOCOLS["dc"], PROTOCOLS["dsa"]
  # get_daparam: 'crop_scale_rotate' for MNIST, else 'none'; main.py: 1000 epochs when the
  # strategy is not 'none', else 300.
  for dataset, spec, epochs in [("mnist", "dc:crop_scale_rotate", 1000),
                                ("fashion_mnist", "", 300), ("cifar10", "", 300), ("", "", 300)]:
    assert resolve_schedule(dc, 10, dataset=dataset) == (epochs, 10, 1, spec)
  # main.py (method DSA), main_DM.py, MTT's distill.py: DSA's strategy and 1000 epochs.
  for dataset in ("mnist", "cifar10", ""):
    assert resolve_schedule(dsa, 10, dataset=dataset) == (1000, 10, 1, DSA_STRATEGY)
  # Explicit choices win over the dataset's; 'none' turns augmentation off.
  assert resolve_schedule(dc, 10, dataset="cifar10", augment="dc:crop").augment == "dc:crop"
  assert resolve_schedule(dc, 10, dataset="mnist", augment="none") == (300, 10, 1, "")
  # 500 images at batch 256: DC's DataLoader gives 2 batches an epoch (256 + 244).
  assert resolve_schedule(dsa, 500) == (2000, 256, 2, DSA_STRATEGY)


def test_the_report_protocol_is_fifty_epochs_cosine_without_augmentation():
  report = PROTOCOLS["report"]
  assert (report.schedule, report.lr, report.loss) == ("cosine", 0.01, "xent")
  # 100 images: one batch an epoch; all of MNIST at 256: ceil(60000 / 256) = 235 an epoch.
  assert resolve_schedule(report, 100, dataset="mnist") == (50, 100, 1, "")
  assert resolve_schedule(report, 60_000, dataset="mnist") == (50 * 235, 256, 235, "")


@pytest.mark.parametrize("protocol,dataset,spec,batch_mode", [
    ("dc", "mnist", "dc:crop_scale_rotate", True),  # DC's augmentation draws per image itself
    ("dsa", "mnist", DSA_STRATEGY, False),  # DiffAugment without a seed: Siamese off, per image
    ("frepo", "mnist", "color_crop_cutout_scale_rotate", True),
])
@pytest.mark.slow
def test_training_augments_as_the_protocol_says(monkeypatch, protocol, dataset, spec, batch_mode):
  calls = []
  real = kip.train.apply_augment

  def spy(key, x, augment, *, batch_mode):
    calls.append((augment, batch_mode))
    return real(key, x, augment, batch_mode=batch_mode)

  monkeypatch.setattr(kip.train, "apply_augment", spy)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((20, 28, 28, 1)).astype(np.float32)
  y = centered_one_hot(np.arange(20) % 10, 10)
  net = make_net("mlp", 10, width=8)
  train_and_evaluate(net, PROTOCOLS[protocol], x, y, x[:10], np.arange(10), steps=2,
                     dataset=dataset, progress=False, log=lambda s: None)
  assert set(calls) == {(spec, batch_mode)}  # traced once per compiled step


def test_dc_without_a_dataset_trains_unaugmented_and_says_so(monkeypatch):
  monkeypatch.setattr(kip.train, "apply_augment", None)  # never called without augmentation
  x = np.random.default_rng(0).standard_normal((10, 28, 28, 1)).astype(np.float32)
  y = centered_one_hot(np.arange(10), 10)
  lines = []
  protocol = dataclasses.replace(PROTOCOLS["dc"], epochs=2)
  result = train_and_evaluate(make_net("mlp", 10, width=8), protocol, x, y, x, np.arange(10),
                              progress=False, log=lines.append)
  assert result.steps == 2
  assert any("no dataset given" in line and "mnist" in line for line in lines)


def test_soft_labels_train_toward_their_probabilities():
  """A set with soft labels (DATM's) is fitted by the cross-entropy against them: a net trained
  long on two images labelled (0.7, 0.2, 0.1) and (0.1, 0.3, 0.6) predicts about those
  probabilities, where hard labels (their argmax) would drive them toward 1."""
  from kip.train import is_soft, make_predict

  y = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)
  assert is_soft(y) and not is_soft(centered_one_hot(np.array([0, 2]), 3))
  assert not is_soft(np.array([[1.2, -0.1, -0.1], [0.1, 0.5, 0.4]]))  # KIP's learned labels
  x = np.random.default_rng(0).normal(size=(2, 4, 4, 1)).astype(np.float32)
  net = make_net("mlp", 3, width=16)
  protocol = dataclasses.replace(PROTOCOLS["dc"], weight_decay=0.0, schedule="constant")
  result = train_and_evaluate(net, protocol, x, y, None, None, steps=400, lr=0.1, augment="none",
                              progress=False, log=lambda _: None)
  probs = np.asarray(jax.nn.softmax(make_predict(net)(result.states, x)))[0]
  np.testing.assert_allclose(probs, y, atol=0.02)


@pytest.mark.parametrize("n,lr,wd", [(10, 1e-3, 1e-3), (100, 1e-2, 1e-3), (500, 1e-2, 0.0),
                                     (2000, 1e-2, 0.0)])
def test_rfad_takes_the_official_best_hyperparameters_for_the_set_size(n, lr, wd):
  """RFAD's official MNIST choices (ANCHORS): ipc 1 lr 1e-3 wd 1e-3, ipc 10 lr 1e-2 wd 1e-3,
  ipc 50 lr 1e-2 wd 0; larger sets keep the last row."""
  resolved = PROTOCOLS["rfad"].at_size(n)
  assert (resolved.lr, resolved.weight_decay) == (lr, wd)


def test_training_uses_the_rate_of_the_set_size():
  x = np.random.default_rng(0).standard_normal((10, 8, 8, 1)).astype(np.float32)
  y = centered_one_hot(np.arange(10), 10)
  protocol = dataclasses.replace(PROTOCOLS["rfad"], width=4, steps=2)
  result = train_and_evaluate(make_net("convnet3", 10, width=4), protocol, x, y, None, None,
                              progress=False, log=lambda _: None)
  assert result.lr == 1e-3
