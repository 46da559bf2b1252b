"""DataDAM and DM: the attention map and both losses against NumPy on the step's own network, the
class grouping, and a resumed run equal to an uninterrupted one in the loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_resumed_equals_straight, make_mhist_folder

from kip.io import load_distilled
from kip.loop import LoopConfig, read_metrics, run
from kip.method import Batch, make_sampler
from kip.nets import make_net
from methods.datadam import attention_map, class_grouped, image_stats, make_datadam
from methods.dm import make_dm

RNG = np.random.default_rng(0)
SHAPE, CLASSES, IPC, REAL = (8, 8, 1), 3, 2, 5
X = RNG.normal(size=(60, *SHAPE)).astype(np.float32)
LABELS = np.arange(60) % CLASSES
Y = (np.eye(CLASSES)[LABELS] - 1 / CLASSES).astype(np.float32)


def test_attention_map_is_the_normalised_channel_sum_of_powers():
  f = RNG.normal(size=(2, 3, 4, 5))
  for p in (1.0, 4.0):
    a = (np.abs(f) ** p).sum(-1).reshape(2, 12)
    expected = a / np.linalg.norm(a, axis=1, keepdims=True)
    np.testing.assert_allclose(attention_map(jnp.asarray(f, jnp.float32), p), expected,
                               rtol=1e-5)
  assert np.all(np.asarray(attention_map(jnp.zeros((1, 2, 2, 3)), 4.0)) == 0)


def _numpy_loss(norm, x_syn, y_syn, x_real, y_real, key, power, w_att, w_emb, groups="class"):
  """The loss in float64 NumPy from the activations of the step's network (drawn from the same
  key), each class's real and synthetic images passed separately (their own batch statistics),
  or with `groups="all"` all real images in one pass and all synthetic ones in another (the
  statistics of every class together, as DataDAM's official code)."""
  net = make_net("convnet3", CLASSES, width=4, norm=norm, image_shape=SHAPE, dc_padding=True)
  variables = net.init(jax.random.split(key)[0], jnp.zeros((1, *SHAPE)), train=False)

  def forward(x):
    e, col = net.apply(variables, jnp.asarray(x), train=True, features=True,
                       mutable=["intermediates", "batch_stats"])
    blocks = [np.asarray(col["intermediates"][f"block_{i}"][0], np.float64) for i in range(2)]
    maps = []
    for f in blocks:
      a = (np.abs(f) ** power).sum(-1).reshape(len(f), -1)
      maps.append(a / np.linalg.norm(a, axis=1, keepdims=True))
    return maps, np.asarray(e, np.float64)

  if groups == "all":
    (maps_r_all, e_r_all), (maps_s_all, e_s_all) = forward(x_real), forward(x_syn)

  total = 0.0
  for c in range(CLASSES):
    real, syn = y_real.argmax(1) == c, y_syn.argmax(1) == c
    if groups == "all":
      maps_r, e_r = [a[real] for a in maps_r_all], e_r_all[real]
      maps_s, e_s = [a[syn] for a in maps_s_all], e_s_all[syn]
    else:
      maps_r, e_r = forward(x_real[real])
      maps_s, e_s = forward(x_syn[syn])
    att = sum(((a.mean(0) - b.mean(0)) ** 2).sum() for a, b in zip(maps_r, maps_s, strict=True))
    total += w_att * att + w_emb * ((e_r.mean(0) - e_s.mean(0)) ** 2).sum()
  return total


def test_datadam_loss_matches_numpy_on_the_steps_network(power=1.0):  # p = 4: attention test
  method = make_datadam(num_classes=CLASSES, image_shape=SHAPE, width=4, power=power,
                        real_per_class=REAL, augment="", norm_groups="class")
  # The support arrives class-interleaved and the real batch shuffled: both are regrouped.
  state = method.init(jax.random.key(0), X[:IPC * CLASSES], Y[:IPC * CLASSES])
  perm = RNG.permutation(REAL * CLASSES)
  x_real, y_real = X[30:30 + REAL * CLASSES][perm], Y[30:30 + REAL * CLASSES][perm]
  key = jax.random.key(5)
  expected = _numpy_loss("batch", X[:6], Y[:6], x_real, y_real, key, power, 100.0, 1.0)
  x_before = np.asarray(state.x)
  state, metrics = method.update(state, Batch(x_real, y_real), key, 1)
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
  # SGD's first step (momentum 0.5 has no history yet): x - lr * grad moved the images.
  assert not np.allclose(np.asarray(state.x), x_before)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_datadam_with_every_class_in_one_pass_matches_numpy(norm):
  """`norm_groups="all"`: batch norm over every class's images at once, as the official code;
  with instance norm the grouping changes nothing, so the per-class reference holds too."""
  method = make_datadam(num_classes=CLASSES, image_shape=SHAPE, width=4, power=4.0,
                        real_per_class=REAL, augment="", norm=norm, norm_groups="all")
  state = method.init(jax.random.key(0), X[:IPC * CLASSES], Y[:IPC * CLASSES])
  x_real, y_real = X[30:30 + REAL * CLASSES], Y[30:30 + REAL * CLASSES]
  key = jax.random.key(7)
  args = (norm, X[:6], Y[:6], x_real, y_real, key, 4.0, 100.0, 1.0)
  expected = _numpy_loss(*args, groups="all")
  _, metrics = method.update(state, Batch(x_real, y_real), key, 1)
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
  per_class = _numpy_loss(*args)
  if norm == "instance":
    assert expected == pytest.approx(per_class, rel=1e-6)
  else:  # the statistics differ, and so does the loss
    assert abs(expected - per_class) > 1e-3 * abs(per_class)


def test_dm_loss_is_the_embedding_term_alone_with_instance_norm():
  method = make_dm(num_classes=CLASSES, image_shape=SHAPE, width=4, real_per_class=REAL,
                   augment="")
  state = method.init(jax.random.key(0), X[:6], Y[:6])
  key = jax.random.key(6)
  x_real, y_real = X[30:45], Y[30:45]
  expected = _numpy_loss("instance", X[:6], Y[:6], x_real, y_real, key, 4.0, 0.0, 1.0)
  _, metrics = method.update(state, Batch(x_real, y_real), key, 1)
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
  assert float(metrics["attention_loss"]) == 0  # no attention term


def test_the_support_is_grouped_by_class_and_must_be_balanced():
  x, y = class_grouped(X[:6], Y[:6])
  assert list(y.argmax(1)) == [0, 0, 1, 1, 2, 2]
  np.testing.assert_array_equal(x[1], X[3])  # class 0's second image, stable order
  with pytest.raises(ValueError, match="same number of synthetic images per class"):
    class_grouped(X[:5], Y[:5])


@pytest.mark.slow
def test_a_scale_blind_loss_only_grows_the_images_and_standardise_rescales_the_written_set():
  # One image per class through batch norm over each class apart: the loss cannot see an image's
  # scale, so its gradient is orthogonal to the image and SGD only grows it. `export_stats` leaves
  # the learning alone and writes each image standardised to the given mean and std.
  common = dict(num_classes=CLASSES, image_shape=SHAPE, width=4, real_per_class=REAL, augment="",
                lr=100.0, norm_groups="class")
  batch, key = Batch(X[30:45], Y[30:45]), jax.random.key(7)
  x0 = np.asarray(X[:CLASSES], np.float64)  # one image of each class, in class order
  states, exported = {}, {}
  for stats in (None, (0.25, 1.5)):
    method = make_datadam(**common, export_stats=stats)
    state = method.init(jax.random.key(0), X[:CLASSES], Y[:CLASSES])
    states[stats] = method.update(state, batch, key, 1)[0]
    exported[stats] = np.asarray(method.export(states[stats])["images"], np.float64)
  moved = np.asarray(states[None].x, np.float64)
  step, flat = (moved - x0).reshape(CLASSES, -1), x0.reshape(CLASSES, -1)
  cosine = (step * flat).sum(1) / np.linalg.norm(step, axis=1) / np.linalg.norm(flat, axis=1)
  assert np.all(np.linalg.norm(step, axis=1) > 0.1) and np.all(np.abs(cosine) < 1e-2)
  grown = moved.reshape(CLASSES, -1)
  assert np.all(grown.std(1) > flat.std(1))
  np.testing.assert_array_equal(states[(0.25, 1.5)].x, states[None].x)  # learning untouched
  np.testing.assert_array_equal(exported[None], moved)
  expected = 0.25 + 1.5 * (grown - grown.mean(1, keepdims=True)) / grown.std(1, keepdims=True)
  np.testing.assert_allclose(exported[(0.25, 1.5)].reshape(CLASSES, -1), expected, rtol=1e-4,
                             atol=1e-5)


def test_image_stats_average_each_images_mean_and_std():
  x = np.zeros((5000, 2, 2, 1), np.float32)  # more than one chunk
  x[:2500] = np.array([0, 0, 2, 2], np.float32).reshape(2, 2, 1)  # mean 1, std 1
  x[2500:] = 3.0  # mean 3, std 0
  assert image_stats(x) == pytest.approx((2.0, 0.5))


@pytest.mark.slow
@pytest.mark.parametrize("make, augment", [(make_datadam, "crop_flip"), (make_dm, ""),
                                           (functools.partial(make_datadam, export_stats=(0, 1)),
                                            "")])
def test_a_resumed_matching_run_equals_an_uninterrupted_one(tmp_path, make, augment):
  method = make(num_classes=CLASSES, image_shape=SHAPE, width=4, real_per_class=REAL,
                augment=augment)
  config = LoopConfig(steps=6, eval_every=0, checkpoint_every=2, seed=4)

  def go(folder, m):
    return run(m, workdir=str(tmp_path / folder), config=config,
               sampler=make_sampler(m.data, X, LABELS, Y, seed=4), x_init=X[:6], y_init=Y[:6],
               log=lambda _: None, progress=False)

  straight, _ = assert_resumed_equals_straight(go, method, after=3)
  assert not np.allclose(np.asarray(straight.state.x), class_grouped(X[:6], Y[:6])[0])


@pytest.mark.slow
def test_datadam_runs_on_an_mhist_folder_with_convnet7(tmp_path, run_in_process, monkeypatch):
  """MHIST end to end from a folder in its published layout (224x224 RGB): DataDAM picks
  ConvNet-7 and the loop's evaluation trains ConvNet-7 too (`experiments.transfer` picks its
  depth by the same `default_depth`, tested in test_nets). Without the folder: one line."""
  rows = [(label, "train") for label in ("HP", "SSA") * 3] + [("HP", "test"), ("SSA", "test")]
  make_mhist_folder(tmp_path / "manual", rows)
  workdir = tmp_path / "datadam"
  args = ["--dataset", "mhist", "--manual-dir", str(tmp_path / "manual"), "--ipc", "1",
          "--steps", "2", "--width", "2", "--real-per-class", "2", "--eval-every", "2",
          "--eval-steps", "2", "--eval-width", "2", "--workdir", str(workdir), "--no-progress"]
  first = run_in_process("experiments.datadam", *args)
  assert first.returncode == 0, first.stderr
  assert "ConvNet-7 trained on the set (test)" in first.stdout
  distilled = load_distilled(str(workdir / "distilled.npz"))
  assert distilled.images.shape == (2, 224, 224, 3)
  assert distilled.labels.argmax(-1).tolist() == [0, 1]
  evals = [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if "finite_test_acc" in r]
  assert evals == [2]

  monkeypatch.delenv("KIP_MANUAL_DIR", raising=False)
  missing = run_in_process("experiments.dm", "--dataset", "mhist", "--workdir",
                           str(tmp_path / "dm"))
  assert missing.returncode == 2 and missing.stderr.count("error:") == 1
  assert not (tmp_path / "dm").exists()
  assert "mhist is not in tensorflow-datasets: download it from" in missing.stderr
