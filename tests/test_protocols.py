"""The `dc` and `dsa` transfer protocols against the official code they reproduce
(VICO-UoE/DatasetCondensation `main.py`, `main_DM.py`, `utils.py`;
GeorgeCazenavette/mtt-distillation `distill.py`, `utils.py`), and that training augments as each
protocol says."""

import dataclasses

import numpy as np
import pytest

import kip.train
from kip.augment import DSA_STRATEGY
from kip.data import centered_one_hot
from kip.nets import make_net
from kip.train import PROTOCOLS, resolve_schedule, train_and_evaluate


def test_dc_and_dsa_share_the_official_optimiser_and_net():
  for name in ("dc", "dsa"):
    p = PROTOCOLS[name]
    # utils.evaluate_synset: SGD(lr_net=0.01, momentum=0.9, weight_decay=0.0005), x0.1 at half,
    # cross-entropy, batch_train=256; get_network: ConvNet width 128, instancenorm, 3 blocks.
    assert (p.loss, p.lr, p.momentum, p.weight_decay, p.batch_size, p.schedule) == (
        "xent", 0.01, 0.9, 5e-4, 256, "step")
    assert (p.net, p.width, p.norm, p.dc_padding, p.partial_batches) == (
        "convnet3", 128, "instance", True, True)


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
