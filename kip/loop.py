"""The one loop: every distiller and every finite-net training run goes through `run`.

The loop owns every side effect: the real data each step (what the method's `data` asks for, a
pure function of (seed, step)), the progress bar, evaluators by name on their own cadence,
`metrics.jsonl`, atomic checkpoints of any state pytree (PRNG keys included), exact resume, and a
loud stop on a non-finite metric that keeps the last good checkpoint. Randomness is
`fold_in(key(seed), step)`, so a run resumed from a checkpoint takes exactly the steps an
uninterrupted run would have taken.

`metrics.jsonl` has one schema for every run: one JSON object per logged step with `step`,
`wall_time` (seconds since the run began, evaluations included), `train_time` (updates only),
`cpu_time` (CPU seconds of the process, every thread, since the loop began: the compute a run
took whatever else shared the machine; resumed runs add up), the
method's metrics and, on evaluation steps, each evaluator's results. Only `step` is required.

In a multi-host run every process runs this loop on the same batches (a method's sharded kernels
spread the work); only process 0 writes the workdir, and every process resumes from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kip.checkpoint import (
  CheckpointError,
  ResumeError,
  WorkdirBusyError,
  latest_checkpoint,
  remove_temporaries,
  restore_checkpoint,
  save_checkpoint,
  workdir_lock,
)
from kip.io import atomic_write
from kip.method import Method, Sampler, Trainer, check_export
from kip.sharding import is_main_process

__all__ = ["LoopConfig", "Evaluator", "RunResult", "NonFiniteLossError", "ResumeError",
           "CheckpointError", "WorkdirBusyError", "run", "read_metrics", "truncate_metrics",
           "save_checkpoint", "restore_checkpoint", "latest_checkpoint", "initial_state"]


class NonFiniteLossError(RuntimeError):
  """A metric became NaN or infinite; the last good checkpoint and outputs are kept."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """steps: total updates; eval_every: default cadence of evaluators (0: at the end only);
  eval_at_start: also evaluate before the first update; checkpoint_every: steps between
  checkpoints (0: at the end only; every run also checkpoints at its last step); log_every: steps
  between metrics records (evaluation steps are always recorded); seed: root of all randomness.

  select_metric: an evaluator's metric (measured on a validation split, never the test split)
  whose best value (`select_mode` max or min) so far marks the state `save_best` keeps; with
  `patience` > 0 the run stops early once that many steps pass without an improvement."""

  steps: int = 1000
  eval_every: int = 100
  eval_at_start: bool = False
  checkpoint_every: int = 100
  log_every: int = 1
  seed: int = 0
  keep_checkpoints: int = 2
  select_metric: str = ""
  select_mode: str = "max"
  patience: int = 0

  def __post_init__(self):
    if self.select_mode not in ("max", "min"):
      raise ValueError(f"select_mode must be max or min, got {self.select_mode!r}")
    if self.patience < 0:
      raise ValueError(f"patience must be non-negative, got {self.patience}")
    for name in ("steps", "eval_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
    if self.log_every < 1 or self.keep_checkpoints < 1:
      raise ValueError("log_every and keep_checkpoints must be at least 1")


class Evaluator(NamedTuple):
  """A named measurement of the state: `fn(state) -> {metric: value}`, run every `every` steps
  (None: the loop's `eval_every`; 0: at the end only) and at the last step."""

  name: str
  fn: Callable[[Any], dict[str, Any]]
  every: int | None = None


class RunResult(NamedTuple):
  """state: the final state; evals: the latest result of every evaluator, merged; step: the
  last step; wall_time / train_time: seconds (whole run / updates only, resumed runs included);
  steps_per_s: updates per second in this process after the first (compiling) step; best_step:
  the step of the best `select_metric` value (None without one)."""

  state: Any
  evals: dict[str, Any]
  step: int
  wall_time: float
  train_time: float
  steps_per_s: float
  best_step: int | None = None


def _to_json(value):
  value = np.asarray(jax.device_get(value))
  return value.item() if value.ndim == 0 else value.tolist()


def _all_finite(metrics: dict) -> bool:
  for v in metrics.values():
    a = np.asarray(v)
    if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
      return False
  return True


def _due(step: int, every: int, last: int) -> bool:
  return step == last or (every > 0 and step % every == 0)


def initial_state(method: Method | Trainer, key: jax.Array, x_init: Any = None,
                  y_init: Any = None):
  """The abstract state `method.init` would return (`jax.ShapeDtypeStruct` leaves), computed
  without running it: the template a checkpoint is restored onto. An `init` that cannot be
  traced abstractly (it reads its own outputs on the host) is run instead."""
  try:
    template = jax.eval_shape(lambda: method.init(key, x_init, y_init))
  except jax.errors.ConcretizationTypeError:
    return method.init(key, x_init, y_init)
  if method.state_sharding is None:
    return template
  return jax.tree_util.tree_map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=method.state_sharding),
      template)


def run(
    method: Method | Trainer,
    *,
    workdir: str,
    config: LoopConfig,
    sampler: Sampler,
    x_init: Any = None,
    y_init: Any = None,
    evaluators: Sequence[Evaluator] = (),
    save: Callable[[Any, int], None] | None = None,
    save_best: Callable[[Any, int], None] | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    description: str = "distilling",
    span: tuple[int, int] | None = None,
) -> RunResult:
  """Runs (or resumes) `config.steps` updates of `method` in `workdir`.

  The workdir is locked while the run works in it (`WorkdirBusyError` for a second process);
  temporary files an interrupted write left are removed; a run resumes from its newest readable
  checkpoint, restored by tree path onto `jax.eval_shape(method.init)` (`init` is not run).

  Args:
    method: a distiller (`Method`, whose `export` the loop checks at every checkpoint) or a
      `Trainer`.
    sampler: step -> the real batch the method asks for (`kip.method.make_sampler`).
    x_init, y_init: passed to `method.init` (e.g. the initial support set).
    evaluators: named measurements (see `Evaluator`); their results go into metrics.jsonl.
    save: writes the run's output (e.g. the distilled set) for `(state, step)`, atomically; called
      at every checkpoint, so the output on disk always matches the newest checkpoint.
    save_best: writes the output of the best state so far by `config.select_metric` (e.g.
      `distilled_best.npz`), when it improves.
    description: the progress bar's label.
    span: (steps of the whole job done before this run, the job's total steps), for a job of
      several runs (`experiments.transfer`'s rows): the bar counts the whole job, so its ETA is
      the job's. None: the bar counts this run.
  """
  writer = is_main_process()  # several processes (multi-host) run this loop; only one writes
  if writer:
    os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
  with workdir_lock(workdir) if writer else contextlib.nullcontext():
    if writer:
      remove_temporaries(workdir)
    return _run(method, workdir, config, sampler, x_init, y_init, evaluators, save, save_best,
                log, progress, description, writer, span or (0, config.steps))


def _run(method, workdir, config, sampler, x_init, y_init, evaluators, save, save_best, log,
         progress, description, writer, span) -> RunResult:
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  root_key = jax.random.key(config.seed)
  init_key = jax.random.fold_in(root_key, 0)
  start_step, wall_offset, train_time, cpu_offset = 0, 0.0, 0.0, 0.0
  meta = {"schedule_steps": method.schedule_steps}
  restored = restore_checkpoint(workdir, initial_state(method, init_key, x_init, y_init), log=log)
  if restored is None:
    state = method.init(init_key, x_init, y_init)
  else:
    state, start_step, wall_offset, train_time = restored[:4]
    cpu_offset = restored.meta.get("cpu_time", 0.0)
    was = restored.meta.get("schedule_steps", 0)
    if was != method.schedule_steps:
      raise ResumeError(
          f"{workdir} holds a run whose learning-rate schedule spans {was} steps; resuming it "
          f"with --steps {config.steps} would change that schedule mid-run. Pass --steps {was} "
          "to finish it as planned, or start afresh with a new --workdir")
    if start_step > config.steps:
      raise ResumeError(
          f"{workdir} holds a run at step {start_step}, beyond the {config.steps} steps asked "
          f"for; pass --steps {start_step} or more to continue it, or use a new --workdir")
    if writer:
      truncate_metrics(metrics_path, start_step)
    log(f"resuming from step {start_step} ({workdir})")
  if isinstance(method, Method):
    user_save = save

    def save(state, step):  # noqa: F811  the loop checks the contract before any output
      check_export(method.export(state))
      if user_save is not None:
        user_save(state, step)

  def write(record: dict) -> None:
    if writer:
      try:
        with open(metrics_path, "a") as f:
          f.write(json.dumps(record) + "\n")
      except OSError as e:  # disk full: named by the file (kip.cli prints it in one line)
        raise OSError(e.errno, e.strerror or str(e), metrics_path) from None

  def evaluate(step: int, at_start: bool = False) -> dict:
    results = {}
    for ev in evaluators:
      every = config.eval_every if ev.every is None else ev.every
      if at_start or _due(step, every, config.steps):
        results.update({k: _to_json(v) for k, v in ev.fn(state).items()})
    return results

  def checkpoint(step: int, wall: float, cpu: float) -> None:
    if writer:
      if save is not None:
        save(state, step)
      save_checkpoint(workdir, state, step, wall, config.keep_checkpoints, train_time,
                      meta | {"cpu_time": cpu})

  last_eval = _last_evals(metrics_path) if start_step else {}
  best_step, best_value = _best(read_metrics(metrics_path) if start_step else [], config)

  def select(step: int, results: dict) -> None:
    nonlocal best_step, best_value
    value = results.get(config.select_metric)
    if _improves(value, best_value, config.select_mode):
      best_step, best_value = step, value
      if writer and save_best is not None:
        save_best(state, step)
  if start_step == 0:
    if writer:
      truncate_metrics(metrics_path, -1)
    if config.eval_at_start and evaluators:
      last_eval = evaluate(0, at_start=True)
      write({"step": 0, "wall_time": 0.0, "train_time": 0.0, "cpu_time": 0.0, **last_eval})
      log(f"step 0: {_format(last_eval)}")
      select(0, last_eval)

  stopped = bool(config.patience and best_step is not None
                 and start_step - best_step >= config.patience)
  if stopped:
    log(f"stopped early at step {start_step} before ({config.select_metric}: best {best_value:.5g} "
        f"at step {best_step})")
  bar = tqdm(total=span[1], initial=span[0] + start_step, disable=not (progress and writer),
             unit="step", dynamic_ncols=True)
  if start_step < config.steps:
    bar.set_description(f"{description}: compiling the step")
  t0 = time.perf_counter() - wall_offset
  cpu0 = time.process_time() - cpu_offset
  steady_time, steady_steps = 0.0, 0  # after the first (compiling) step
  last = config.steps if not stopped else start_step

  def synced(step: int) -> bool:
    """Whether the state after `step` is read on the host (an evaluation, a checkpoint, the last
    step): the loop waits for that step before dispatching the next, whose update may donate
    the state's buffers."""
    return (step == last or _due(step, config.checkpoint_every, last) or any(
        _due(step, config.eval_every if ev.every is None else ev.every, last)
        for ev in evaluators))

  def finish(step: int, metrics) -> None:
    """Fetches step's metrics (the update dispatched one step later is already queued behind it,
    so the device never waits for the host), stops on a non-finite one, and records them."""
    nonlocal train_time, clock, steady_time, steady_steps
    metrics = jax.device_get(metrics)
    if not _all_finite(metrics):
      bar.close()
      kept_last = latest_checkpoint(workdir)
      bad = {k: _to_json(v) for k, v in metrics.items()}
      kept = (f"The last good checkpoint (step {kept_last[0]}) and outputs are kept in "
              f"{workdir}. To retry with another setting (e.g. a lower --lr), use a new --workdir"
              if kept_last else
              "Nothing was finished; retry with another setting (e.g. a lower --lr)")
      raise NonFiniteLossError(
          f"a non-finite value at step {step} ({_format(bad)}); stopped. {kept}")
    now = time.perf_counter()
    elapsed, clock = now - clock, now
    train_time += elapsed
    if step > start_step + 1:
      steady_time, steady_steps = steady_time + elapsed, steady_steps + 1
    else:
      bar.set_description(description)
    # A record is built only for the steps that keep one, and the bar's numbers only when it
    # shows: at a few ms a step (moment matching's), the host's per-step work is what the loop
    # adds (`python -m bench.method_loop`).
    if step % config.log_every == 0 or synced(step):
      pending_records.append(
          {"step": step, **{k: _to_json(v) for k, v in metrics.items()},
           "wall_time": round(now - t0, 6), "train_time": round(train_time, 6),
           "cpu_time": round(time.process_time() - cpu0, 6)})
    if not bar.disable and (step % 10 == 0 or step == last):
      bar.set_postfix({k: f"{np.mean(v):.4g}" for k, v in metrics.items()
                       if k == "loss" or k.endswith("acc") or k.endswith("acc_mean")},
                      refresh=False)
    bar.update(1)

  # The device runs step s while the host samples the batch of s + 1 and records step s - 1;
  # `train_time` is the loop's time outside evaluations and checkpoints.
  clock = time.perf_counter()  # when the loop last finished a step (or an evaluation)
  pending_records: list[dict] = []
  in_flight = None  # (step, metrics) dispatched and not yet fetched
  step = start_step
  batch = sampler(start_step + 1) if start_step < last else None
  for step in range(start_step + 1, last + 1):
    key = jax.random.fold_in(root_key, step)
    state, metrics = method.update(state, batch, key, jnp.asarray(step, jnp.int32))
    if step < last:
      batch = sampler(step + 1)
    if in_flight is not None:
      finish(*in_flight)
    in_flight = (step, metrics)
    for record in pending_records:
      write(record)
    pending_records.clear()
    if not synced(step):
      continue
    finish(*in_flight)
    in_flight = None
    record = pending_records.pop()
    results = evaluate(step)
    if results:
      last_eval = {**last_eval, **results}
      record.update(results)
      select(step, results)
      record["wall_time"] = round(time.perf_counter() - t0, 3)
    write(record)
    stop = bool(config.patience and best_step is not None
                and step - best_step >= config.patience)
    if _due(step, config.checkpoint_every, last) or stop:
      checkpoint(step, record["wall_time"], record["cpu_time"])
    clock = time.perf_counter()  # evaluations and checkpoints are not training time
    if stop:
      log(f"stopping early at step {step}: {config.select_metric} has not improved for "
          f"{config.patience} steps (best {best_value:.5g} at step {best_step})")
      break
  bar.close()
  if (start_step == config.steps or stopped) and writer and save is not None:
    save(state, config.steps)  # already finished: make sure the output on disk is this one
  wall = time.perf_counter() - t0
  rate = steady_steps / steady_time if steady_steps else math.nan
  return RunResult(state, last_eval, step, wall, train_time, rate, best_step)


def _format(metrics: dict) -> str:
  parts = []
  for k, v in metrics.items():
    v = np.asarray(v)
    parts.append(f"{k} {v.item():.5g}" if v.ndim == 0 else f"{k} {np.round(v, 5).tolist()}")
  return "  ".join(parts)


def _best(records: list[dict], config: LoopConfig) -> tuple[int | None, float | None]:
  """(step, value) of the best recorded `select_metric` (resume: from metrics.jsonl)."""
  if not config.select_metric:
    return None, None
  best_step, best_value = None, None
  for r in records:  # strict improvements in step order, as the live run decided them
    value = r.get(config.select_metric)
    if _improves(value, best_value, config.select_mode):
      best_step, best_value = r["step"], value
  return best_step, best_value


def _improves(value, best, mode: str) -> bool:
  """Whether a recorded `value` (None: not measured) strictly beats `best` (None: none yet)."""
  if value is None:
    return False
  return best is None or (value > best if mode == "max" else value < best)


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl file."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise
      # A run killed mid-append leaves at most a partial last line; its step is redone anyway.
  return records


_BOOKKEEPING = ("step", "wall_time", "train_time", "cpu_time")


def _last_evals(path: str) -> dict:
  """The newest value of every metric recorded so far (the last step always evaluates, so a
  finished run's last record holds every evaluator's final result)."""
  latest = {}
  for r in read_metrics(path):
    latest.update({k: v for k, v in r.items() if k not in _BOOKKEEPING})
  return latest


def truncate_metrics(path: str, last_step: int) -> None:
  """Drops records after `last_step` (they belong to steps the checkpoint does not hold)."""
  records = [r for r in read_metrics(path) if r["step"] <= last_step]
  atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())
