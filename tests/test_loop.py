"""The loop: an interrupted run resumes to the same result; a non-finite loss stops it cleanly."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from kip.kernels import make_kernel
from kip.kip import Method, make_kip
from kip.loop import LoopConfig, NonFiniteLossError, read_metrics, run

RNG = np.random.default_rng(0)
X = RNG.normal(size=(300, 4, 4, 1)).astype(np.float32)
LABELS = RNG.integers(0, 3, 300)
Y = (np.eye(3)[LABELS] - 1 / 3).astype(np.float32)
CONFIG = LoopConfig(steps=12, target_batch=30, eval_every=4, checkpoint_every=3, seed=5)


def evaluate(x, y):
  return {"test_acc": 0.0, "test_mse": float(jnp.mean(y**2))}


def run_loop(workdir, method, saved):
  return run(method, workdir=str(workdir), config=CONFIG, x_train=X, y_train=Y,
             labels_train=LABELS, x_init=X[:6], y_init=Y[:6], evaluate=evaluate,
             save_support=lambda x, y, step: saved.update(x=x, y=y, step=step),
             log=lambda _: None, progress=False)


class Interrupt(Exception):
  pass


def interrupting(method, after):
  calls = {"n": 0}

  def update(*args):
    calls["n"] += 1
    if calls["n"] > after:
      raise Interrupt
    return method.update(*args)

  return method._replace(update=update)


@pytest.mark.parametrize("interrupt_after", [1, 4, 7])
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, interrupt_after):
  method = make_kip(make_kernel("fc").kernel_fn, lr=0.05)
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
  base = make_kip(make_kernel("fc").kernel_fn, lr=0.05)

  def update(state, key, x_t, y_t):
    state, metrics = base.update(state, key, x_t, y_t)
    step = state.opt_state[0].count
    return state, metrics | {"loss": jnp.where(step >= 5, jnp.nan, metrics["loss"])}

  saved = {}
  with pytest.raises(NonFiniteLossError, match=r"at step 5.*step 3"):
    run_loop(tmp_path, Method(base.init, update, base.support), saved)
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
