"""The loop: an interrupted run resumes to the same result; a non-finite loss stops it cleanly."""

import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import Interrupt, interrupting

from kip.kernels import make_kernel
from kip.loop import (
  Evaluator,
  LoopConfig,
  NonFiniteLossError,
  read_metrics,
  restore_checkpoint,
  run,
  save_checkpoint,
)
from kip.method import Data, Method, make_sampler
from methods.kip import make_kip

RNG = np.random.default_rng(0)
X = RNG.normal(size=(300, 4, 4, 1)).astype(np.float32)
LABELS = RNG.integers(0, 3, 300)
Y = (np.eye(3)[LABELS] - 1 / 3).astype(np.float32)
CONFIG = LoopConfig(steps=12, eval_every=4, eval_at_start=True, checkpoint_every=3, seed=5)


def evaluate(state):
  return {"test_acc": 0.0, "test_mse": float(jnp.mean(state.y**2))}


def run_loop(workdir, method, saved, config=CONFIG, x_init=X[:6], y_init=Y[:6]):
  sampler = make_sampler(method.data, X, LABELS, Y, seed=config.seed)
  return run(method, workdir=str(workdir), config=config, sampler=sampler, x_init=x_init,
             y_init=y_init, evaluators=[Evaluator("krr", evaluate)],
             save=lambda state, step: saved.update(
                 x=np.asarray(method.export(state)["images"]),
                 y=np.asarray(method.export(state)["labels"]), step=step),
             log=lambda _: None, progress=False)


@pytest.mark.parametrize("interrupt_after", [1, 4, 7])
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, interrupt_after):
  method = make_kip(make_kernel("fc").apply, lr=0.05, target_batch=30)
  straight = {}
  run_loop(tmp_path / "straight", method, straight)

  resumed = {}
  with pytest.raises(Interrupt):
    run_loop(tmp_path / "resumed", interrupting(method, interrupt_after), resumed)
  run_loop(tmp_path / "resumed", method, resumed)

  assert resumed["step"] == straight["step"] == 12
  np.testing.assert_allclose(resumed["x"], straight["x"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(resumed["y"], straight["y"], rtol=1e-6, atol=1e-7)
  steps = [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")]
  assert steps == list(range(13))  # every step logged exactly once
  evals = [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")
           if "test_acc" in r]
  assert evals == [0, 4, 8, 12]
  assert all("wall_time" in r and "loss" in r
             for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")[1:])
  def losses(name):
    return [(r["step"], r.get("loss")) for r in read_metrics(tmp_path / name / "metrics.jsonl")]

  np.testing.assert_allclose(np.array(losses("resumed"), float), np.array(losses("straight"),
                                                                          float), rtol=1e-6)
  # Re-running a finished run changes nothing.
  again = {}
  run_loop(tmp_path / "resumed", method, again)
  np.testing.assert_array_equal(again["x"], resumed["x"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  base = make_kip(make_kernel("fc").apply, lr=0.05, target_batch=30)

  def update(state, batch, key, step):
    state, metrics = base.update(state, batch, key, step)
    return state, metrics | {"loss": jnp.where(step >= 5, jnp.nan, metrics["loss"])}

  saved = {}
  with pytest.raises(NonFiniteLossError, match=r"at step 5.*step 3"):
    run_loop(tmp_path, base._replace(update=update), saved)
  assert saved["step"] == 3
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["ckpt_00000003.npz"]
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [0, 1, 2, 3, 4]


def test_partial_last_metrics_line_from_a_kill_is_ignored(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
  assert [r["step"] for r in read_metrics(path)] == [0, 1]
  path.write_text('{"step": 0}\n{"ste\n{"step": 2}\n')
  with pytest.raises(json.JSONDecodeError):
    read_metrics(path)


class ToyState(NamedTuple):
  key: jax.Array  # a typed PRNG key in the state
  x: jax.Array
  count: jax.Array


def toy_method() -> Method:
  """A method with a PRNG key in its state that needs no real data: each step draws noise from
  its own key (split every step) and the step's key, and moves x toward it."""

  def init(key, x_init, y_init):
    del y_init
    return ToyState(jax.random.fold_in(key, 7), jnp.asarray(x_init), jnp.zeros((), jnp.int32))

  @jax.jit
  def update(state, batch, key, step):
    assert batch is None
    own, sub = jax.random.split(state.key)
    noise = jax.random.normal(sub, state.x.shape) + jax.random.normal(key, state.x.shape)
    x = 0.9 * state.x + 0.1 * noise + 0.01 * step
    return ToyState(own, x, state.count + 1), {"loss": jnp.mean(x**2)}

  return Method(init, update, lambda s: {"images": s.x, "targets": s.x.reshape(len(s.x), -1)},
                Data("none"))


@pytest.mark.parametrize("interrupt_after", [2, 5])
def test_a_method_with_a_key_in_its_state_and_no_batch_checkpoints_and_resumes(
    tmp_path, interrupt_after):
  config = LoopConfig(steps=9, eval_every=0, checkpoint_every=2, seed=3)
  method = toy_method()
  outputs = {}

  def save(name):
    return lambda state, step: outputs.__setitem__(name, (np.asarray(state.x), step))

  def go(name, m):
    sampler = make_sampler(m.data, None)
    return run(m, workdir=str(tmp_path / name), config=config, sampler=sampler,
               x_init=np.zeros((4, 2, 2, 1), np.float32),
               evaluators=[Evaluator("count", lambda s: {"count": s.count})], save=save(name),
               log=lambda _: None, progress=False)

  straight = go("straight", method)
  with pytest.raises(Interrupt):
    go("resumed", interrupting(method, interrupt_after))
  resumed = go("resumed", method)
  np.testing.assert_array_equal(np.asarray(resumed.state.x), np.asarray(straight.state.x))
  np.testing.assert_array_equal(jax.random.key_data(resumed.state.key),
                                jax.random.key_data(straight.state.key))
  assert outputs["resumed"][1] == 9 and int(resumed.state.count) == 9
  records = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, 10))  # no step 0: eval_every 0
  assert [r["step"] for r in records if "count" in r] == [9]  # evaluated at the end only


def test_steps_below_an_existing_checkpoint_are_refused(tmp_path):
  from kip.loop import ResumeError

  method = make_kip(make_kernel("fc").apply, lr=0.05, target_batch=30)
  run_loop(tmp_path, method, {})
  with pytest.raises(ResumeError, match="step 12"):
    run_loop(tmp_path, method, {}, config=LoopConfig(steps=6, eval_every=4, seed=5))


@pytest.mark.parametrize("interrupt_after", [None, 5])
def test_selection_keeps_the_best_state_and_patience_stops_the_run(tmp_path, interrupt_after):
  """A validation metric peaking at step 4: the best output is step 4's, and with patience 3
  the run stops at step 7, also when interrupted after 5 updates and resumed."""
  config = LoopConfig(steps=20, eval_every=1, checkpoint_every=1, seed=0,
                      select_metric="val_acc", patience=3)
  method = toy_method()
  best, saved = {}, {}

  def go(m):
    return run(m, workdir=str(tmp_path), config=config, sampler=make_sampler(m.data, None),
               x_init=np.zeros((2, 2, 2, 1), np.float32),
               evaluators=[Evaluator("val", lambda s: {"val_acc": -abs(int(s.count) - 4)})],
               save=lambda s, step: saved.update(step=step),
               save_best=lambda s, step: best.update(step=step, count=int(s.count)),
               log=lambda _: None, progress=False)

  if interrupt_after:
    with pytest.raises(Interrupt):
      go(interrupting(method, interrupt_after))
  result = go(method)
  assert (result.step, result.best_step) == (7, 4)
  assert best == {"step": 4, "count": 4} and saved["step"] == 7
  again = go(method)  # an early-stopped run stays stopped
  assert again.step == 7 and int(again.state.count) == 7


def test_a_restored_state_is_placed_as_the_fresh_one_and_reuses_the_compiled_step(tmp_path):
  """`jit` keys its programs on whether arguments are committed to a device: a state restored
  committed where the fresh one is not would compile the step again (a resume in the same
  process). Committed leaves (a mesh's replication) come back committed, with their sharding."""
  from jax import monitoring
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  mesh = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("d",)), PartitionSpec())
  fresh = {"w": jnp.zeros(3), "n": jnp.zeros((), jnp.int32), "key": jax.random.key(1),
           "replicated": jax.device_put(jnp.ones(2), mesh)}
  step = jax.jit(lambda s: {**s, "w": s["w"] + 1, "n": s["n"] + 1,
                            "replicated": s["replicated"] * 2})
  after = step(fresh)
  (tmp_path / "checkpoints").mkdir()
  save_checkpoint(str(tmp_path), after, 1, 0.0)
  restored, at = restore_checkpoint(str(tmp_path), fresh)[:2]
  assert at == 1 and not restored["w"].committed and not restored["key"].committed
  assert restored["replicated"].committed and restored["replicated"].sharding == mesh
  np.testing.assert_array_equal(restored["w"], [1, 1, 1])
  np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                jax.random.key_data(fresh["key"]))
  compiles, counting = [], [True]  # the listener stays registered: it counts only here
  monitoring.register_event_duration_secs_listener(
      lambda name, *_, **__: compiles.append(name) if counting[0] and name.endswith(
          "/backend_compile_duration") else None)
  step(restored)
  counting[0] = False
  assert compiles == []


def test_cpu_time_is_the_processes_and_adds_up_over_a_resume(tmp_path):
  """`cpu_time` in metrics.jsonl: never more than the CPU time the process spent (measured
  around the run), non-decreasing, and a resumed run carries on from its checkpoint's."""
  import time

  from kip.checkpoint import latest_checkpoint

  method = make_kip(make_kernel("fc").apply, lr=0.05, target_batch=30)
  before = time.process_time()
  run_loop(tmp_path / "straight", method, {})
  spent = time.process_time() - before
  cpu = [r["cpu_time"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]
  assert cpu == sorted(cpu) and 0 < cpu[-1] <= spent
  with pytest.raises(Interrupt):
    run_loop(tmp_path / "resumed", interrupting(method, 7), {})
  step, path = latest_checkpoint(str(tmp_path / "resumed"))
  with np.load(path) as checkpoint:
    at_checkpoint = json.loads(str(checkpoint["__meta__"]))["cpu_time"]
  assert at_checkpoint > 0
  before = time.process_time()
  run_loop(tmp_path / "resumed", method, {})
  spent = time.process_time() - before
  resumed = [r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if r["step"] > step]
  assert all(at_checkpoint <= r["cpu_time"] <= at_checkpoint + spent for r in resumed)


def test_the_host_samples_and_records_while_the_next_step_runs(tmp_path):
  """The device is never left waiting for the host: the batch of step s + 1 is drawn and the
  metrics of step s are read only after step s + 1 is dispatched, except where the host reads
  the state after s (a checkpoint, the last step), whose next update may donate it."""
  events = []

  class Metric:  # a metric that notes when the loop reads it on the host
    def __init__(self, step):
      self.step = step

    def __array__(self, dtype=None, copy=None):
      events.append(("fetch", self.step))
      return np.asarray(1.0, dtype or np.float32)

  def update(state, batch, key, step):
    events.append(("update", int(step)))
    return state + 1, {"loss": Metric(int(step))}

  def sampler(step):
    events.append(("sample", step))

  method = Method(lambda key, x, y: jnp.zeros((2, 2, 2, 1)), update,
                  lambda s: {"images": s, "targets": s.reshape(2, -1)}, Data("none"))
  result = run(method, workdir=str(tmp_path), config=LoopConfig(steps=6, eval_every=0,
                                                                 checkpoint_every=3),
               sampler=sampler, log=lambda _: None, progress=False)
  assert float(result.state.sum()) == 6 * 8
  order = {event: i for i, event in enumerate(events)}
  assert len(order) == len(events) == 6 * 3  # every step sampled, updated, fetched once
  for step in (1, 2, 4, 5):
    assert order[("sample", step + 1)] < order[("fetch", step)]
    assert order[("update", step + 1)] < order[("fetch", step)]
  for step in (3,):  # checkpointed: read before the next update is dispatched
    assert order[("fetch", step)] < order[("update", step + 1)]
  assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
