"""KRR-ST and its pool: the outer loss against float64 NumPy for a fixed pool model, the pool's
start, age and re-initialisation rules (with and without the counter reset), a resumed
distillation equal to an uninterrupted one, and the knowledge-distillation student."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_resumed_equals_straight

from kip.loop import LoopConfig, read_metrics, run
from kip.method import Batch, make_sampler, tracing
from kip.pool import make_pool
from methods.krr_st import make_krr_st, pool_features
from methods.nets import make_net

RNG = np.random.default_rng(0)
SHAPE, DIM = (8, 8, 1), 6
X = RNG.normal(size=(120, *SHAPE)).astype(np.float32)
PROJECTION = RNG.normal(size=(int(np.prod(SHAPE)), DIM)).astype(np.float32) / 8


def linear_teacher(variables, x):
  """A stand-in teacher: a fixed linear map of the flattened image."""
  return x.reshape(len(x), -1) @ variables


def _method(**kwargs):
  settings = {"image_shape": SHAPE, "teacher": linear_teacher,
              "teacher_variables": jnp.asarray(PROJECTION), "target_dim": DIM, "steps": 10,
              "width": 4, "num_models": 3, "max_online_updates": 4, "target_batch": 30,
              "crop_pad": 0} | kwargs
  return make_krr_st(**settings)


def test_krr_st_loss_matches_numpy_for_a_fixed_pool_model():
  method = _method()
  x_s = X[:12]
  y_s = np.asarray(linear_teacher(PROJECTION, x_s))
  state = method.init(jax.random.key(0), x_s, y_s)
  features = pool_features(4, DIM, SHAPE)
  f_s = np.asarray(features(state.pool, x_s), np.float64)
  x_t = X[40:70]
  f_t = np.asarray(features(state.pool, x_t), np.float64)
  # NumPy: a ones column for the bias, ridge 1e-6 * tr(K_ss) (not divided by n), MSE averaged
  # over the batch and the representation's dimensions.
  f_s = np.hstack([f_s, np.ones((len(f_s), 1))])
  f_t = np.hstack([f_t, np.ones((len(f_t), 1))])
  k_ss = f_s @ f_s.T
  pred = f_t @ f_s.T @ np.linalg.solve(k_ss + 1e-6 * np.trace(k_ss) * np.eye(12), y_s)
  expected = np.mean((pred - x_t.reshape(30, -1).astype(np.float64) @ PROJECTION) ** 2)
  _, metrics = method.update(state, Batch(x_t), jax.random.key(1), 1)
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-3)


def _pool(reset, reinit="before", start="random"):
  net = make_net("krr_st_convnet", DIM, width=2, norm="batch", image_shape=SHAPE)

  def mse(out, y):
    return jnp.mean((out - y) ** 2)

  return make_pool(net, SHAPE, optax.sgd(0.05), loss=mse, num_models=2, max_updates=3,
                   start=start, reinit=reinit, reset=reset)


def _visit(pool, state, i, key):
  state = state._replace(index=jnp.asarray(i, jnp.int32))
  y = jnp.asarray(linear_teacher(PROJECTION, X[:8]))
  new, _ = _compiled(pool.step)(state, key, jnp.asarray(X[:8]), y)
  return new


_COMPILED = {}


def _compiled(fn):
  """One compiled step per pool (op-by-op dispatch of a conv net's step is slow on CPU)."""
  return _COMPILED.setdefault(fn, jax.jit(fn))


def _model(state, i):
  return [np.asarray(a[i]) for a in jax.tree_util.tree_leaves(state.params)]


@pytest.mark.slow
@pytest.mark.parametrize("reset", [True, False])
def test_pool_age_and_reinitialisation_rules(reset):
  pool = _pool(reset)
  y = jnp.asarray(linear_teacher(PROJECTION, X[:8]))
  state = pool.init(jax.random.key(0), jnp.asarray(X[:8]), y)
  # Started at a random count in [1, max - 1], trained that many steps.
  assert all(1 <= int(c) <= 2 for c in state.steps)
  start = int(state.steps[0])
  ages, changed = [], []
  for visit in range(6):
    before = _model(state, 0)
    state = _visit(pool, state, 0, jax.random.key(10 + visit))
    ages.append(int(state.steps[0]))
    changed.append(any(not np.array_equal(a, b) for a, b in zip(before, _model(state, 0),
                                                                 strict=True)))
  # Each visit: one SGD step (count + 1) until the count reaches 3, then the next visit
  # re-initialises instead (the KRR-ST rule: check before updating).
  expected, count = [], start
  for _ in range(6):
    if count >= 3:
      count = 0 if reset else count
    else:
      count += 1
    expected.append(count)
  assert ages == expected
  assert all(changed)  # every visit changes the model: a step or a fresh initialisation
  if not reset:
    # The official code's pool: stuck at the limit, re-initialised at every later visit, so
    # two visits in a row leave two different fresh models that never trained.
    assert ages[-2:] == [3, 3]
  assert int(state.steps[1]) == int(pool.init(jax.random.key(0), jnp.asarray(X[:8]),
                                              y).steps[1])  # other models untouched


def test_frepo_pool_reinitialises_right_after_its_last_update():
  pool = _pool(True, reinit="after", start="stagger")
  state = pool.init(jax.random.key(0), jnp.asarray(X[:8]), jnp.zeros((8, DIM)))
  np.testing.assert_array_equal(state.steps, [0, 1])  # staggered by max // models
  ages = []
  for visit in range(4):
    state = _visit(pool, state, 1, jax.random.key(visit))
    ages.append(int(state.steps[1]))
  assert ages == [2, 0, 1, 2]
  with pytest.raises(ValueError, match="reset=False"):
    _pool(False, reinit="after")


@pytest.mark.slow
def test_a_resumed_krr_st_run_equals_an_uninterrupted_one(tmp_path):
  method = _method(crop_pad=2, max_online_updates=3)
  config = LoopConfig(steps=7, eval_every=0, checkpoint_every=3, seed=2)
  y_init = np.asarray(linear_teacher(PROJECTION, X[:10]))

  def go(folder, m):
    return run(m, workdir=str(tmp_path / folder), config=config,
               sampler=make_sampler(m.data, X, seed=2), x_init=X[:10], y_init=y_init,
               log=lambda _: None, progress=False)

  prepared = []  # the pool's start (init for real): by a fresh start only, not by a resume

  def init(key, x, y):
    state = method.init(key, x, y)
    if not tracing(state.x):  # a resume only asks for init's shapes (jax.eval_shape)
      prepared.append(1)
    return state

  straight, _ = assert_resumed_equals_straight(go, method._replace(init=init), after=4)
  assert len(prepared) == 2  # the straight run and the interrupted one
  assert not np.array_equal(np.asarray(straight.state.x), X[:10])  # it did learn


@pytest.mark.slow
def test_kd_student_learns_the_teachers_soft_predictions(tmp_path):
  from evaluation.kd import _soft_cross_entropy, make_student
  from kip.train import init_states

  logits_s = RNG.normal(size=(5, 4))
  logits_t = RNG.normal(size=(5, 4))
  p_t = np.exp(logits_t) / np.exp(logits_t).sum(1, keepdims=True)
  log_p_s = logits_s - np.log(np.exp(logits_s).sum(1, keepdims=True))
  assert float(_soft_cross_entropy(jnp.asarray(logits_s), jnp.asarray(logits_t))) == \
      pytest.approx(-np.mean(np.sum(p_t * log_p_s, axis=1)), rel=1e-5)

  net = make_net("krr_st_convnet", 4, width=2, norm="batch", image_shape=SHAPE)
  teacher = jax.tree_util.tree_map(lambda a: a[0], init_states(net, optax.sgd(0.1), [7], SHAPE))
  # A confident teacher (its readout scaled up), so its decisions are there to be learned.
  readout = {k: v * 30 for k, v in teacher.params["readout"].items()}
  teacher = teacher._replace(params={**teacher.params, "readout": readout})
  student = make_student(net, teacher, X[:40], seeds=[0, 1], steps=60, batch=20, augment="",
                         image_shape=SHAPE)
  result = run(student, workdir=str(tmp_path), config=LoopConfig(steps=60, eval_every=0),
               sampler=make_sampler(student.data, None), log=lambda _: None, progress=False)
  losses = [r["loss"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))]
  assert np.all(np.asarray(losses[-1]) < np.asarray(losses[0]))
  # Trained only on the teacher's soft predictions of the inputs, the students agree with the
  # teacher's decisions there far more often than chance (1/4).
  variables = {"params": teacher.params, "batch_stats": teacher.batch_stats}
  decided = np.argmax(net.apply(variables, X[:40], train=False), -1)
  for i in range(2):
    state = jax.tree_util.tree_map(lambda a, i=i: a[i], result.state)
    mine = np.argmax(net.apply({"params": state.params, "batch_stats": state.batch_stats},
                               X[:40], train=False), -1)
    assert np.mean(mine == decided) > 0.6


def test_bench_shares_pretraining_across_labelled_budgets(tmp_path):
  from bench.krr_st import _share_pretraining  # noqa: PLC0415

  done, new = tmp_path / "pretrain-fashion_mnist-1000", tmp_path / "pretrain-fashion_mnist-0"
  for row in ("random", "distilled"):
    (done / row / "pretrain" / "checkpoints").mkdir(parents=True)
    (done / row / "pretrain" / "metrics.jsonl").write_text(f"{row}\n")
    (done / row / "finetune").mkdir()
  (done / "none" / "finetune").mkdir(parents=True)  # no pre-training: nothing to share
  (new / "distilled" / "pretrain").mkdir(parents=True)  # already there: left alone
  _share_pretraining(str(done), str(new))
  assert (new / "random" / "pretrain" / "metrics.jsonl").read_text() == "random\n"
  assert (new / "random" / "pretrain" / "checkpoints").is_dir()
  assert not (new / "random" / "finetune").exists()  # fine-tuning depends on the labels
  assert not (new / "none").exists()
  assert not (new / "distilled" / "pretrain" / "metrics.jsonl").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([done.name, new.name])  # no .tmp
