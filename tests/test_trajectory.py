"""Trajectory matching: the normalised loss against NumPy, the student's gradient against finite
differences in float64, the expert store's round trip and refusal, PAD's curriculum fractions and
shallow-parameter masks, resumed expert training and distillation equal to uninterrupted runs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import Interrupt, assert_resumed_equals_straight, interrupting
from jax.flatten_util import ravel_pytree

import kip.store
import methods.trajectory as trajectory
from kip.loop import LoopConfig, run
from kip.method import make_sampler
from kip.nets import make_net
from methods.trajectory import (
  ExpertStore,
  StoreMismatch,
  curriculum_window,
  depth_mask,
  epoch_plan,
  expert_steps,
  make_student,
  make_trajectory_matching,
  smallest_error_mask,
  train_expert,
  trajectory_loss,
)

RNG = np.random.default_rng(0)
SHAPE, CLASSES = (8, 8, 1), 3
MODEL = make_net("convnet3", CLASSES, width=3, depth=2, norm="instance", image_shape=SHAPE)
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, *SHAPE)), train=False)["params"]
P = ravel_pytree(PARAMS)[0].size
X = RNG.normal(size=(48, *SHAPE)).astype(np.float32)
LABELS = np.arange(48) % CLASSES


def test_trajectory_loss_is_the_normalised_squared_distance():
  a, b, c, m = (RNG.normal(size=50) for _ in range(4))
  mask = (m > 0).astype(np.float64)
  got = trajectory_loss(*(jnp.asarray(v, jnp.float32) for v in (a, b, c)))
  np.testing.assert_allclose(got, np.sum((a - c) ** 2) / np.sum((b - c) ** 2), rtol=1e-5)
  got = trajectory_loss(*(jnp.asarray(v, jnp.float32) for v in (a, b, c, mask)))
  expected = np.sum(mask * (a - c) ** 2) / np.sum(mask * (b - c) ** 2)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_the_student_step_gradient_matches_finite_differences_in_float64():
  """d loss / d (images, lr) through two differentiable SGD steps, against central
  differences along random directions, all in float64 (compiled as a loop; unrolled, the same
  program runs everywhere else on CPU)."""
  with jax.enable_x64(True):
    theta0, unravel = ravel_pytree(jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                                          PARAMS))
    target = theta0 + 0.05 * jnp.asarray(RNG.normal(size=theta0.shape))
    x = jnp.asarray(X[:6], jnp.float64)
    targets = jax.nn.one_hot(jnp.asarray(LABELS[:6]), CLASSES, dtype=jnp.float64)
    key = jax.random.key(3)
    for syn_steps in (2,):  # through two steps: the second differentiates through the first
      student = make_student(MODEL, unravel, syn_steps=syn_steps, batch_syn=4)

      @jax.jit
      def loss(x, lr, student=student):
        return trajectory_loss(student(x, targets, lr, theta0, key), theta0, target)

      lr = jnp.asarray(0.1, jnp.float64)
      gx, glr = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, lr)
      direction = jnp.asarray(RNG.normal(size=x.shape))
      eps = 1e-5
      numeric = (loss(x + eps * direction, lr) - loss(x - eps * direction, lr)) / (2 * eps)
      np.testing.assert_allclose(jnp.vdot(gx, direction), numeric, rtol=1e-6)
      numeric_lr = (loss(x, lr + eps) - loss(x, lr - eps)) / (2 * eps)
      np.testing.assert_allclose(glr, numeric_lr, rtol=1e-6)


def test_a_student_minibatch_larger_than_the_set_is_the_whole_set_once():
  theta0, unravel = ravel_pytree(PARAMS)
  x, targets = jnp.asarray(X[:6]), jax.nn.one_hot(jnp.asarray(LABELS[:6]), CLASSES)
  key = jax.random.key(2)
  whole = make_student(MODEL, unravel, syn_steps=2)(x, targets, 0.1, theta0, key)
  larger = make_student(MODEL, unravel, syn_steps=2, batch_syn=100)(x, targets, 0.1, theta0, key)
  np.testing.assert_allclose(larger, whole, rtol=1e-6, atol=1e-7)
  # by hand: two full-batch SGD steps on the mean cross-entropy (every image exactly once each)
  def xent(theta):
    logits = MODEL.apply({"params": unravel(theta)}, x, train=True)
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1))
  expected = theta0 - 0.1 * jax.grad(xent)(theta0)
  expected = expected - 0.1 * jax.grad(xent)(expected)
  np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-6)


def test_the_store_round_trips_and_refuses_other_settings(tmp_path):
  settings = {"dataset": "mnist", "width": 3, "lr": 0.01}
  store = ExpertStore.create(str(tmp_path), settings, num_params=5, epochs=2)
  traj = RNG.normal(size=(3, 5)).astype(np.float32)
  store.add(1, traj, {"test_acc": 0.5})
  again = ExpertStore.open(str(tmp_path), settings, num_params=5, epochs=2)
  assert again.experts() == [1]
  np.testing.assert_array_equal(again.trajectory(1), traj)
  assert isinstance(again.trajectory(1), np.memmap)  # read lazily, not held
  assert again.record(1) == {"test_acc": 0.5}
  with pytest.raises(StoreMismatch, match="lr: store 0.01, asked 0.02"):
    ExpertStore.create(str(tmp_path), settings | {"lr": 0.02}, num_params=5, epochs=2)
  with pytest.raises(StoreMismatch, match="epochs 2"):
    ExpertStore.open(str(tmp_path), settings, epochs=3)
  with pytest.raises(ValueError, match=r"\(3, 5\)"):
    store.add(2, traj[:2], {})
  with pytest.raises(FileNotFoundError, match="experiments.buffer"):
    ExpertStore.open(str(tmp_path / "none"))


def test_an_expert_killed_between_its_files_is_absent_and_made_again(tmp_path, monkeypatch):
  settings = {"dataset": "mnist"}
  store = ExpertStore.create(str(tmp_path), settings, num_params=5, epochs=2)
  traj = RNG.normal(size=(3, 5)).astype(np.float32)
  store.add(0, traj, {"test_acc": 0.5})
  real_write = kip.store._write

  def killed(path, content):  # the process dies after the trajectory, before its record
    if path.endswith("record.json"):
      raise KeyboardInterrupt
    return real_write(path, content)

  monkeypatch.setattr(kip.store, "_write", killed)
  with pytest.raises(KeyboardInterrupt):
    store.add(1, traj + 1, {"test_acc": 0.6})
  monkeypatch.setattr(kip.store, "_write", real_write)
  assert store.experts() == [0]  # never half an expert
  # A kill by signal leaves its temporary folder behind; the next open removes it.
  (tmp_path / ".expert_002.x1.tmp").mkdir()
  (tmp_path / ".expert_002.x1.tmp" / "trajectory.npy").write_bytes(b"half")
  again = ExpertStore.open(str(tmp_path), settings, num_params=5, epochs=2)
  assert again.experts() == [0] and not (tmp_path / ".expert_002.x1.tmp").exists()
  again.add(1, traj + 1, {"test_acc": 0.6})
  np.testing.assert_array_equal(again.trajectory(1), traj + 1)
  assert again.record(1) == {"test_acc": 0.6}


def test_a_store_in_the_old_flat_layout_is_refused_in_one_line(tmp_path):
  ExpertStore.create(str(tmp_path), {"dataset": "mnist"}, num_params=5, epochs=2)
  np.save(tmp_path / "expert_000.npy", np.zeros((3, 5), np.float32))
  with pytest.raises(StoreMismatch, match="layout before experts were written as units"):
    ExpertStore.open(str(tmp_path))


def test_the_curriculum_grows_then_drops_the_easiest():
  window = dict(init_ratio=0.75, add_end_epoch=20, drops=((40, 0.1), (60, 0.2)))
  assert curriculum_window(0, **window) == (0.0, 0.75)
  assert curriculum_window(10, **window) == (0.0, 0.875)
  assert curriculum_window(20, **window) == (0.0, 1.0)
  assert curriculum_window(39, **window) == (0.0, 1.0)
  assert curriculum_window(40, **window) == (0.1, 1.0)
  assert curriculum_window(75, **window) == (0.2, 1.0)
  assert curriculum_window(5) == (0.0, 1.0)
  # 10 images per class; difficulty = the index (easiest first): the plan keeps the right ones.
  labels = np.repeat(np.arange(2), 10)
  order = np.argsort(np.r_[np.arange(10), np.arange(10)], kind="stable")
  plan = epoch_plan(labels, 3, order=order, window=lambda e: [(0.0, 0.5), (0.0, 1.0),
                                                              (0.2, 1.0)][e])
  np.testing.assert_array_equal(plan[0], np.r_[np.arange(5), 10 + np.arange(5)])
  assert len(plan[1]) == 20
  np.testing.assert_array_equal(plan[2], np.r_[np.arange(2, 10), 10 + np.arange(2, 10)])


def test_the_depth_mask_leaves_out_the_shallowest_parameters():
  # ConvNet blocks conv_0, norm_0, conv_1, norm_1, then the readout: depth order by block.
  sizes = {name: sum(a.size for a in jax.tree_util.tree_leaves(sub)) for name, sub in
           PARAMS.items()}
  _, unravel = ravel_pytree(PARAMS)
  first_block = sizes["conv_0"] + sizes["norm_0"]
  ratio = first_block / P  # exactly block 0
  tree = unravel(jnp.asarray(depth_mask(PARAMS, ratio + 1e-9)))
  for name, sub in tree.items():
    for leaf in jax.tree_util.tree_leaves(sub):
      assert np.all(np.asarray(leaf) == (0.0 if name.endswith("_0") else 1.0)), name
  mask = depth_mask(PARAMS, 0.5)
  assert mask.sum() == P - np.floor(0.5 * P)
  assert depth_mask(PARAMS, 0.0).sum() == P
  # The readout is deepest: never left out before the convolutions are.
  assert np.all(np.asarray(unravel(jnp.asarray(mask))["readout"]["kernel"]) == 1.0)
  with pytest.raises(ValueError, match="ratio"):
    depth_mask(PARAMS, 1.0)


def test_the_smallest_error_mask_drops_the_best_matched_entries():
  theta = jnp.asarray([0.0, 1.0, 2.0, 3.0])
  target = jnp.asarray([0.1, 0.0, 2.0, 1.0])  # squared errors 0.01, 1, 0, 4
  np.testing.assert_array_equal(smallest_error_mask(theta, target, 0.5), [0, 1, 0, 1])
  np.testing.assert_array_equal(smallest_error_mask(theta, target, 0.1), [1, 1, 1, 1])


def _store(tmp_path, experts=2, epochs=3):
  store = ExpertStore.create(str(tmp_path / "store"), {"dataset": "test"}, P, epochs)
  plan = epoch_plan(LABELS, epochs)
  for i in range(experts):
    train_expert(store, i, MODEL, X, LABELS, plan=plan, batch=16, lr=0.05, seed=i,
                 augment="crop_flip", log=lambda _: None, progress=False)
  return store, plan


@pytest.mark.slow
def test_an_interrupted_expert_resumes_to_the_same_trajectory(tmp_path, monkeypatch):
  store, plan = _store(tmp_path, experts=1)
  straight = np.array(store.trajectory(0))
  assert straight.shape == (4, P) and not np.allclose(straight[0], straight[-1])
  assert not os.path.exists(store.work_dir(0))
  other = ExpertStore.create(str(tmp_path / "other"), {"dataset": "test"}, P, 3)
  real = trajectory.make_expert
  monkeypatch.setattr(trajectory, "make_expert",
                      lambda *a, **k: interrupting(real(*a, **k), after=5))  # mid-epoch 2
  with pytest.raises(Interrupt):
    train_expert(other, 0, MODEL, X, LABELS, plan=plan, batch=16, lr=0.05, seed=0,
                 augment="crop_flip", log=lambda _: None, progress=False)
  assert other.experts() == []
  monkeypatch.setattr(trajectory, "make_expert", real)
  train_expert(other, 0, MODEL, X, LABELS, plan=plan, batch=16, lr=0.05, seed=0,
               augment="crop_flip", log=lambda _: None, progress=False)
  np.testing.assert_array_equal(np.asarray(other.trajectory(0)), straight)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mtt", "pad"])
def test_a_resumed_matching_run_equals_an_uninterrupted_one(tmp_path, name):
  """MTT, and PAD (= DATM's soft labels, widening window and threshold, plus a mask)."""
  from methods.pad import make_pad

  store, _ = _store(tmp_path)
  y = jax.nn.one_hot(LABELS[:6], CLASSES)
  common = dict(image_shape=SHAPE, syn_steps=3, expert_epochs=1, max_start_epoch=1,
                lr_img=10.0, lr_lr=1e-4, augment="crop", seed=1)
  if name == "mtt":
    method = make_trajectory_matching(MODEL, PARAMS, store, **common)
  else:
    method = make_pad(MODEL, PARAMS, store, ratio=0.3, max_start_epoch_final=3, steps=6,
                      lr_y=1.0, threshold=2.0, **common)
  config = LoopConfig(steps=6, eval_every=0, checkpoint_every=2, seed=1, log_every=1)

  def go(folder, m):
    return run(m, workdir=str(tmp_path / folder), config=config,
               sampler=make_sampler(m.data, None), x_init=X[:6], y_init=y,
               log=lambda _: None, progress=False)

  straight, _ = assert_resumed_equals_straight(go, method, after=3)
  assert not np.allclose(np.asarray(straight.state.x), X[:6])
  assert float(straight.state.lr) != pytest.approx(0.01)
  if name == "pad":
    assert not np.allclose(np.asarray(straight.state.y), y)  # the soft labels learn
    return
  with pytest.raises(StoreMismatch, match="parameters"):
    make_trajectory_matching(make_net("convnet3", CLASSES, width=4, depth=2, image_shape=SHAPE),
                             {"w": jnp.zeros(3)}, store, image_shape=SHAPE)
  with pytest.raises(ValueError, match="epochs"):
    make_trajectory_matching(MODEL, PARAMS, store, image_shape=SHAPE, expert_epochs=2,
                             max_start_epoch=3)


def test_datm_widens_its_window_and_skips_updates_above_the_threshold(tmp_path):
  from methods.datm import start_window

  assert [start_window(s, first=2, last=5, steps=4) for s in (1, 2, 3, 4)] == [2, 3, 4, 5]
  assert start_window(7, first=3, last=3, steps=10) == 3
  store, _ = _store(tmp_path, experts=1)
  y = jax.nn.one_hot(LABELS[:6], CLASSES) * 3.0  # logits
  method = make_trajectory_matching(MODEL, PARAMS, store, image_shape=SHAPE, syn_steps=1,
                                    expert_epochs=1, max_start_epoch=2, soft_labels=True,
                                    lr_y=1.0, skip_above=1e-9)
  state = method.init(None, X[:6], y)
  x0, y0 = np.asarray(state.x), np.asarray(state.y)
  state, metrics = method.update(state, None, jax.random.key(0), jnp.asarray(1))
  assert float(metrics["skipped"]) == 1.0 and float(metrics["loss"]) > 1e-9
  np.testing.assert_array_equal(np.asarray(state.x), x0)
  np.testing.assert_array_equal(np.asarray(state.y), y0)
  exported = method.export(state)
  np.testing.assert_allclose(exported["labels"], jax.nn.softmax(y0), rtol=1e-6)


class _Linear:
  """A stand-in classifier for `correctly_classified`: logits = flattened image @ W."""

  def apply(self, variables, x, train):
    del train
    return x.reshape(len(x), -1) @ variables["params"]


def test_datm_initial_images_are_the_first_correct_ones_of_each_class_in_a_seeded_order():
  """Against the definition in NumPy (every image classified; per class, in `rng([seed, 1])`'s
  order, the correct ones first): the same indices and logits, though each class is classified
  only until it has enough; a class with too few correct images is completed with wrong ones."""
  from methods.datm import correctly_classified

  rng = np.random.default_rng(1)
  x = rng.normal(size=(90, 2, 2, 1)).astype(np.float32)
  labels = np.arange(90) % 3
  w = rng.normal(size=(4, 3)).astype(np.float32)
  logits = x.reshape(90, -1) @ w
  correct = logits.argmax(-1) == labels
  # Class 0 has 5 correct images of 30, classes 1 and 2 have 13 and 15: ipc 8 stops early there.
  assert correct[labels == 0].sum() < 8 <= min(correct[labels == c].sum() for c in (1, 2))
  order = np.random.default_rng([5, 1])
  expected = []
  for c in range(3):
    members = order.permutation(np.flatnonzero(labels == c))
    expected.append(np.concatenate([members[correct[members]], members[~correct[members]]])[:8])
  expected = np.concatenate(expected)
  model = _Linear()
  idx, got_logits = correctly_classified(model, jnp.asarray(w), x, labels, 8, 3, seed=5, chunk=7)
  np.testing.assert_array_equal(idx, expected)
  np.testing.assert_allclose(got_logits, logits[expected], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="class 0 has 30 training images, fewer than ipc 31"):
    correctly_classified(model, jnp.asarray(w), x, labels, 31, 3, seed=5, chunk=7)


def test_experts_take_pytorchs_init_on_request_and_old_stores_keep_their_folder():
  """`--init torch` builds the experts' (and students') ConvNet with PyTorch's default init; the
  default's settings, and so its store folder, are those recorded before the flag existed."""
  from methods.experts import Config, expert_model

  standard = Config(dataset="mnist")
  torch = Config(dataset="mnist", init="torch")
  assert "init" not in standard.expert_settings()
  assert standard.default_buffer().endswith("mnist-da37823c98e3")  # as recorded before `init`
  assert torch.default_buffer() != standard.default_buffer()
  model = expert_model(torch.expert_settings(), (28, 28, 1), 10)
  params = model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
  for name in ("kernel", "bias"):  # fan_in 32 x 4 x 4; the standard bias is N(0, 0.1^2)
    assert np.abs(np.asarray(params["readout"][name])).max() <= 1 / np.sqrt(512)


def test_one_bar_counts_every_expert_of_the_store(tmp_path, capsys):
  """`experiments.buffer`'s experts share one progress bar (`span`): the second expert's bar
  starts where the first ended and ends at the store's total, so its ETA is the whole store's."""
  store = ExpertStore.create(str(tmp_path / "store"), {"dataset": "test"}, P, 2)
  plan = epoch_plan(LABELS, 2)
  each = expert_steps(plan, 16)
  for i in range(2):
    train_expert(store, i, MODEL, X, LABELS, plan=plan, batch=16, lr=0.05, seed=i,
                 log=lambda _: None, progress=True, span=(i * each, 2 * each))
  assert store.record(0)["steps"] == store.record(1)["steps"] == each  # as the sampler ran them
  bars = capsys.readouterr().err
  assert f" {each}/{2 * each} " in bars and f" {2 * each}/{2 * each} " in bars, bars
  assert f"/{each} " not in bars  # no bar counts one expert alone


def test_a_resumed_stores_bar_counts_only_the_experts_left():
  """Experts 0 and 2 of 4 in the store: 1 and 3 train, one after the other, on one bar of
  2 x 50 steps; a lone expert keeps its own bar."""
  from methods.experts import bar_spans

  assert bar_spans({1, 3}, 4, 50) == [None, (0, 100), None, (50, 100)]
  assert bar_spans({0, 1, 2}, 3, 10) == [(0, 30), (10, 30), (20, 30)]
  assert bar_spans({2}, 4, 50) == [None] * 4
  assert bar_spans(set(), 2, 50) == [None, None]
