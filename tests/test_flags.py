"""Bad numbers on the command line: every int and float flag of every command (found from
`experiments/*.py`, so a new command is covered) refuses what its declared range refuses, NaN and
infinity always, in one line naming the flag, before any data is read; a failed command leaves
no run folder behind, a full disk is one line, and a diverged expert is not stored."""

import dataclasses
import errno
import importlib
import os
import pkgutil
import subprocess
import sys
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from jax.flatten_util import ravel_pytree

import experiments
from kip import cli
from kip.loop import NonFiniteLossError
from kip.nets import make_net
from methods.trajectory import ExpertStore, epoch_plan, train_expert

COMMANDS = sorted(m.name for m in pkgutil.iter_modules(experiments.__path__))


def _job(command: str):
  module = importlib.import_module(f"experiments.{command}")
  assert hasattr(module, "JOB"), f"experiments.{command} has no JOB (kip.command.Job)"
  return module.JOB


def _numeric_fields(config_cls) -> list[tuple[dataclasses.Field, type]]:
  hints = typing.get_type_hints(config_cls)
  return [(f, hints[f.name]) for f in dataclasses.fields(config_cls)
          if hints[f.name] in (int, float)]


def _flag(f: dataclasses.Field) -> str:
  return "--" + f.name.replace("_", "-")


def _parse(job, f: dataclasses.Field, value: str):
  """`value` for `f`'s flag (or positional argument) through the command's own parsing."""
  argv = [value] if f.name in job.positional else [f"{_flag(f)}={value}"]  # = for -inf
  return cli.parse_config(job.config, argv, "", positional=job.positional, presets=job.presets)


def _allowed(f: dataclasses.Field, kind: type, value: float) -> bool:
  """Whether `value` lies in `f`'s declared range (with the default upper bounds)."""
  m = f.metadata
  high = m["maximum"]
  if high is None and m["below"] is None:
    high = cli.INT_MAXIMUM if kind is int else cli.FLOAT_MAXIMUM
  return ((m["minimum"] is None or value >= m["minimum"])
          and (m["above"] is None or value > m["above"])
          and (high is None or value <= high)
          and (m["below"] is None or value < m["below"]))


def _refused(job, f: dataclasses.Field, value: str) -> str:
  with pytest.raises(cli.UserError) as error:
    _parse(job, f, value)
  message = str(error.value)
  assert "\n" not in message
  assert _flag(f) in message, (value, message)
  return message


@pytest.mark.parametrize("command", COMMANDS)
def test_every_numeric_flag_refuses_what_its_range_refuses(command):
  job = _job(command)
  fields = _numeric_fields(job.config)
  for f, kind in fields:
    m = f.metadata
    # A declared lower bound everywhere: no flag takes any negative number by omission.
    assert m["minimum"] is not None or m["above"] is not None, f"{command} {_flag(f)}: no range"
    high = m["maximum"] if m["maximum"] is not None else m["below"]
    assert high is None or high <= (cli.SEED_MAXIMUM if kind is int else cli.FLOAT_MAXIMUM)
    values = ["-1", "0", "1", str(10**23)] if kind is int else \
        ["-1", "0", "0.5", "1", "1e300", "1e-300"]
    for value in values:
      if _allowed(f, kind, float(value)):
        assert getattr(_parse(job, f, value), f.name) == kind(value)
      else:
        _refused(job, f, value)
    if kind is int:
      top = m["maximum"] if m["maximum"] is not None else cli.INT_MAXIMUM
      _refused(job, f, str(top + 1))
      _refused(job, f, str(10**23))
    else:
      for value in ("nan", "inf", "-inf", "NaN", "1e400"):  # 1e400 parses as inf
        assert "finite" in _refused(job, f, value)
      _refused(job, f, "1e300")  # infinite in float32
    # A negative value is accepted only as a sentinel its help documents ("-1: the last").
    if _allowed(f, kind, -1):
      assert "-1:" in m["help"], f"{command} {_flag(f)} accepts -1 without saying what it means"
      assert not _allowed(f, kind, -2)
    # Zero steps or epochs mean a run that does nothing; accepted only as a documented sentinel.
    if kind is int and ("steps" in f.name or "epochs" in f.name) and _allowed(f, kind, 0):
      assert "0:" in m["help"], f"{command} {_flag(f)} accepts 0 without saying what it means"


@pytest.mark.parametrize("command", COMMANDS)
def test_seeds_are_what_jax_and_numpy_take(command):
  job = _job(command)
  f = job.config.__dataclass_fields__.get("seed")
  if f is not None:
    assert _parse(job, f, "0").seed == 0
    assert _parse(job, f, str(2**32 - 1)).seed == 2**32 - 1
    jax.random.key(2**32 - 1)
    np.random.default_rng([2**32 - 1, 7])
    _refused(job, f, "-1")  # np.random.default_rng refuses it
    _refused(job, f, str(2**32))  # jax.random.key keeps 32 bits: seed 2**32 would be seed 0


def test_steps_of_zero_are_refused_where_they_mean_nothing():
  for command in ("kip", "frepo", "rfad", "krr_st", "moments", "dm", "datadam", "mtt", "datm",
                  "pad", "kd"):
    job = _job(command)
    f = job.config.__dataclass_fields__["steps"]
    assert "at least 1" in _refused(job, f, "0")
  transfer = _job("transfer")  # 0: the protocol's
  assert _parse(transfer, transfer.config.__dataclass_fields__["steps"], "0").steps == 0


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["experiments.kip", "--lr", "nan"], "--lr must be a finite number, got nan"),
    (["experiments.kip", "--seed", "-1"], "--seed must be at least 0, got -1"),
    (["experiments.transfer", "--width", "-8", "--support", "x.npz"],
     "--width must be at least 0, got -8"),
    (["experiments.buffer", "--lr", "inf"], "--lr must be a finite number, got inf"),
])
def test_a_bad_number_is_one_line_and_leaves_nothing_behind(tmp_path, args, message):
  out = _run(tmp_path, *args)
  assert out.returncode == 2, out.stderr
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert lines == [f"error: {message}"], out.stderr
  assert "Traceback" not in out.stderr and out.stdout == ""
  assert os.listdir(tmp_path) == []  # no runs/ folder, no workdir


@dataclasses.dataclass(frozen=True)
class _Config(cli.RunConfig):
  pass


def _main_in(workdir, fail: BaseException, work: str = ""):
  """A command's main that makes its workdir (`workdir`, or '': the default), writes `work` (a
  file name in it) and fails."""

  def main(argv):
    del argv
    folder = cli.prepare_workdir(_Config(workdir=str(workdir) if workdir else ""), "test", [])
    if work:
      os.makedirs(os.path.dirname(os.path.join(folder, work)), exist_ok=True)
      with open(os.path.join(folder, work), "w") as f:
        f.write("x")
    raise fail

  return main


@pytest.fixture
def fresh_cli(monkeypatch):
  monkeypatch.setattr(cli, "_CREATED", [])
  monkeypatch.setattr(cli, "_MADE_ABOVE", [])
  monkeypatch.setattr(cli, "_WORKDIR", None)


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, fresh_cli):
  monkeypatch.chdir(tmp_path)  # the default workdir: ./runs/test-<time>
  full = OSError(errno.ENOSPC, "No space left on device", "/x/ckpt.tmp")
  with pytest.raises(SystemExit) as exit_:
    cli.run_main(_main_in("", full, "metrics.jsonl"))
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.splitlines() == ["error: cannot write /x/ckpt.tmp: No space left on device"]
  assert os.listdir(tmp_path) == []  # nothing finished: no workdir, no ./runs


@pytest.mark.parametrize("number", [errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT])
def test_a_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, fresh_cli, number):
  with pytest.raises(SystemExit) as exit_:
    cli.run_main(_main_in(tmp_path / "w", OSError(number, os.strerror(number), "/x/out.npz")))
  assert exit_.value.code == 2
  verb = "" if number in (errno.EACCES, errno.EPERM) else "cannot write "
  assert capsys.readouterr().err == f"error: {verb}/x/out.npz: {os.strerror(number)}\n"


def test_an_unexpected_error_keeps_its_traceback_and_leaves_no_empty_workdir(tmp_path, capsys,
                                                                             fresh_cli):
  with pytest.raises(ZeroDivisionError):
    cli.run_main(_main_in(tmp_path / "w", ZeroDivisionError("bug"), "checkpoints/ckpt.tmp"))
  assert not (tmp_path / "w").exists()
  with pytest.raises(FileNotFoundError):  # an OSError that is no full disk: a traceback too
    cli.run_main(_main_in(tmp_path / "v", FileNotFoundError(errno.ENOENT, "gone", "/x")))
  assert not (tmp_path / "v").exists()
  assert capsys.readouterr().err == ""


def test_a_workdir_with_finished_work_is_kept(tmp_path, fresh_cli):
  with pytest.raises(ZeroDivisionError):
    cli.run_main(_main_in(tmp_path / "w", ZeroDivisionError("bug"),
                          "checkpoints/ckpt_00000010.npz"))
  assert (tmp_path / "w" / "checkpoints" / "ckpt_00000010.npz").exists()
  with pytest.raises(SystemExit):
    cli.run_main(_main_in(tmp_path / "v", cli.UserError("late"), "row/distilled.npz"))
  assert (tmp_path / "v" / "row" / "distilled.npz").exists()


def test_a_diverged_expert_is_not_stored(tmp_path):
  """One SGD step whose update overflows float32 (lr x weight decay x weights): the loop's check
  sees only the loss before it, so the store's own check is what refuses the expert."""
  shape, classes = (8, 8, 1), 2
  model = make_net("convnet3", classes, width=2, depth=1, norm="instance", image_shape=shape)
  params = model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)["params"]
  n_params = ravel_pytree(params)[0].size
  x = np.random.default_rng(0).normal(size=(8, *shape)).astype(np.float32)
  labels = np.arange(8) % classes
  store = ExpertStore.create(str(tmp_path / "store"), {"dataset": "test"}, n_params, 1)
  with pytest.raises(NonFiniteLossError, match=r"^expert 0 diverged: .* epoch 1 on.*--lr"):
    train_expert(store, 0, model, x, labels, plan=epoch_plan(labels, 1), batch=8, lr=1e30,
                 weight_decay=1e30, seed=0, log=lambda _: None, progress=False)
  assert store.experts() == []
  finite = np.zeros((2, n_params), np.float32)
  store.add(0, finite, {"expert": 0})
  assert store.experts() == [0]
