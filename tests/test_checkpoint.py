"""Checkpoints keyed by tree path and the workdir lock (`kip.checkpoint`), and what the loop does
with them when a run was killed: a damaged newest checkpoint, leftover temporary files, a second
process on the same workdir, a changed step count under a step-dependent schedule, and a
checkpoint from before tree paths."""

import subprocess
import sys
import textwrap
import time
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, Interrupt, interrupting

from kip.checkpoint import (
  CheckpointError,
  WorkdirBusyError,
  list_checkpoints,
  restore_checkpoint,
  save_checkpoint,
  workdir_lock,
)
from kip.loop import LoopConfig, ResumeError, run
from kip.method import Data, Method, Trainer, make_sampler


class AB(NamedTuple):
  a: jax.Array
  b: jax.Array


class BA(NamedTuple):  # the same fields, declared in the other order
  b: jax.Array
  a: jax.Array


def test_fields_that_swapped_places_restore_by_name_not_position(tmp_path):
  save_checkpoint(str(tmp_path), AB(jnp.zeros(3), jnp.ones(3)), 1, 0.0)
  template = BA(jax.ShapeDtypeStruct((3,), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.float32))
  restored = restore_checkpoint(str(tmp_path), template, log=lambda _: None).state
  chex.assert_trees_all_equal(restored, BA(b=jnp.ones(3), a=jnp.zeros(3)))


def test_a_checkpoint_of_another_state_is_refused_naming_the_difference(tmp_path):
  save_checkpoint(str(tmp_path), {"x": jnp.zeros((2, 3)), "lr": jnp.ones(())}, 1, 0.0)
  with pytest.raises(CheckpointError, match=r"\['x'\] has shape \(2, 3\), this run's \(4, 3\)"):
    restore_checkpoint(str(tmp_path), {"x": jnp.zeros((4, 3)), "lr": jnp.ones(())})
  with pytest.raises(CheckpointError, match=r"missing \['opt'\]; unexpected \['lr'\]"):
    restore_checkpoint(str(tmp_path), {"x": jnp.zeros((2, 3)), "opt": jnp.ones(())})
  with pytest.raises(CheckpointError, match="is a PRNG key in this run"):
    restore_checkpoint(str(tmp_path), {"x": jnp.zeros((2, 3)), "lr": jax.random.key(0)})


def test_keys_and_dtypes_come_back_onto_an_abstract_template(tmp_path):
  state = {"key": jax.random.split(jax.random.key(3), 2), "n": jnp.asarray(7, jnp.int32),
           "w": jnp.arange(4.0)}
  save_checkpoint(str(tmp_path), state, 5, 1.5, train_time=1.0, meta={"schedule_steps": 9})
  restored = restore_checkpoint(str(tmp_path), jax.eval_shape(lambda: state))
  assert (restored.step, restored.wall_time, restored.train_time) == (5, 1.5, 1.0)
  assert restored.meta == {"schedule_steps": 9}
  np.testing.assert_array_equal(jax.random.key_data(restored.state["key"]),
                                jax.random.key_data(state["key"]))
  chex.assert_trees_all_equal({k: v for k, v in restored.state.items() if k != "key"},
                              {"n": state["n"], "w": state["w"]})
  chex.assert_trees_all_equal_dtypes(restored.state, state)


# A counter: state (count, total); each step adds the step's batch value. Tiny, and every step
# visible in the state, so a resume from the wrong checkpoint shows.
class Count(NamedTuple):
  count: jax.Array
  total: jax.Array


def counter(schedule_steps: int = 0) -> Method:
  def init(key, x, y):
    return Count(jnp.zeros((), jnp.int32), jnp.zeros((1,), jnp.float32))

  @jax.jit
  def update(state, batch, key, step):
    new = Count(state.count + 1, state.total + step.astype(jnp.float32))
    return new, {"loss": new.total[0]}

  def export(state):
    return {"images": jnp.zeros((1, 2, 2, 1)) + state.total, "labels": jnp.ones((1, 2))}

  return Method(init, update, export, Data("none"), schedule_steps=schedule_steps)


def go(workdir, method, steps=6, logs=None):
  return run(method, workdir=str(workdir), config=LoopConfig(steps=steps, eval_every=0,
                                                             checkpoint_every=2,
                                                             keep_checkpoints=3),
             sampler=lambda step: None, log=(logs.append if logs is not None else lambda _: None),
             progress=False)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
  with pytest.raises(Interrupt):
    go(tmp_path, interrupting(counter(), 5))
  (_, older), (_, newest) = list_checkpoints(str(tmp_path))[-2:]
  content = open(newest, "rb").read()
  with open(newest, "wb") as f:
    f.write({"truncated": content[: len(content) // 2], "empty": b"",
             "garbage": b"not a checkpoint at all"}[damage])
  logs = []
  result = go(tmp_path, counter(), logs=logs)
  assert any("ckpt_00000004.npz" in line and "damaged" in line and "step 2" in line
             for line in logs), logs
  assert "resuming from step 2" in logs[-1]
  assert int(result.state.count) == 6 and float(result.state.total[0]) == sum(range(1, 7))


def test_every_checkpoint_damaged_is_refused_in_one_line(tmp_path):
  go(tmp_path, counter(), steps=2)
  for _, path in list_checkpoints(str(tmp_path)):
    open(path, "wb").close()
  with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
    go(tmp_path, counter())


def test_leftover_temporary_files_are_removed_on_start(tmp_path):
  go(tmp_path, counter(), steps=2)
  leftovers = [tmp_path / "checkpoints" / "ckpt_00000004.npz.abc123.tmp",
               tmp_path / "distilled.npz.x9.tmp"]
  for path in leftovers:
    path.write_bytes(b"half a write")
  go(tmp_path, counter(), steps=4)
  assert not any(p.exists() for p in leftovers)
  assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 4]


def test_a_checkpoint_from_before_tree_paths_is_refused_in_one_line(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  np.savez(tmp_path / "checkpoints" / "ckpt_00000002.npz", leaf_0000=np.asarray(2),
           leaf_0001=np.zeros(1, np.float32), step=np.asarray(2), wall_time=np.asarray(1.0))
  with pytest.raises(CheckpointError, match="before checkpoints were keyed by tree path") as e:
    go(tmp_path, counter())
  assert "\n" not in str(e.value)


def test_a_changed_step_count_under_a_step_dependent_schedule_is_refused(tmp_path):
  go(tmp_path, counter(schedule_steps=4), steps=4)
  with pytest.raises(ResumeError, match=r"schedule spans 4 steps.*--steps 6.*--steps 4"):
    go(tmp_path, counter(schedule_steps=6), steps=6)
  # A run whose updates do not depend on the step count may be extended.
  go(tmp_path / "plain", counter(), steps=4)
  assert int(go(tmp_path / "plain", counter(), steps=6).state.count) == 6


@pytest.mark.slow
def test_a_raised_frepo_step_count_is_refused(tmp_path):
  from methods.frepo import make_frepo

  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
  y = np.eye(4, dtype=np.float32)[np.arange(40) % 4] - 0.25

  def frepo(steps):
    return make_frepo(num_classes=4, image_shape=(8, 8, 1), steps=steps, width=4, num_models=2,
                      max_online_updates=4, target_batch=8, augment="")

  def go_frepo(steps):
    method = frepo(steps)
    return run(method, workdir=str(tmp_path), config=LoopConfig(steps=steps, eval_every=0),
               sampler=make_sampler(method.data, x, np.argmax(y, 1), y, seed=0), x_init=x[:4],
               y_init=y[:4], log=lambda _: None, progress=False)

  go_frepo(3)
  with pytest.raises(ResumeError, match="schedule spans 3 steps"):
    go_frepo(4)


def test_a_trainer_runs_in_the_loop_without_an_export(tmp_path):
  method = counter()
  trainer = Trainer(method.init, method.update, method.data)
  assert int(go(tmp_path, trainer).state.count) == 6


def test_a_broken_export_stops_the_run_before_any_output(tmp_path):
  method = counter()
  broken = method._replace(export=lambda s: {"images": jnp.zeros((2, 2, 2, 1)),
                                             "labels": jnp.ones((3, 2))})
  with pytest.raises(ValueError, match="`labels` must be \\(N, D\\) with N = 2"):
    go(tmp_path, broken, steps=2)


def test_a_second_process_on_a_busy_workdir_is_refused(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent(f"""
          import sys, time
          from kip.checkpoint import workdir_lock
          with workdir_lock({str(tmp_path)!r}):
            print("held", flush=True)
            time.sleep(60)
          """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirBusyError, match="another process is running in"):
      go(tmp_path, counter())
    assert not (tmp_path / "metrics.jsonl").exists()  # it wrote nothing
  finally:
    holder.kill()
    holder.wait()
  deadline = time.time() + 10  # the lock goes with the process that held it
  while True:
    try:
      with workdir_lock(str(tmp_path)):
        break
    except WorkdirBusyError:
      assert time.time() < deadline
      time.sleep(0.05)
  assert int(go(tmp_path, counter()).state.count) == 6
