"""Command-line plumbing shared by `experiments/`: flags generated from a config dataclass, the
workdir and its `config.json`, and one-line errors for mistakes a user can make.

A job's config is one frozen dataclass; each field's `metadata` holds its help (and choices), so
a flag and its default exist once. Booleans become `--flag/--no-flag`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import hashlib
import json
import math
import os
import signal
import sys
import threading
import typing
from collections.abc import Callable, Sequence

import numpy as np

from kip.datasets import DATASETS, DataError
from kip.io import LAYOUTS, DistilledSet, FileFormatError, load_distilled, write_json
from kip.loop import NonFiniteLossError, ResumeError
from kip.readers import npz_keys, read_npz_arrays

__all__ = ["UserError", "field", "parse_config", "prepare_workdir", "run_main", "log",
           "report", "is_writer", "setup_devices", "log_devices", "describe_devices",
           "peak_rss_mib", "DataConfig", "RunConfig", "DeviceConfig", "SetReadConfig",
           "SelectionConfig", "log_kernel_layouts", "check_choice", "format_table", "percent"]


class UserError(ValueError):
  """A mistake on the command line or in the workdir; reported in one line."""


USER_ERRORS = (UserError, DataError, FileFormatError, NonFiniteLossError, ResumeError)


# The default upper bound of every int flag (a count, a size, a step) that declares none: a value
# past it (10**23) would overflow int32/int64 arrays deep in the run, after data and compiles.
INT_MAXIMUM = 2**31 - 1
# The default upper bound of every float flag that declares none: the computations are float32,
# where a larger value is infinite.
FLOAT_MAXIMUM = float(np.finfo(np.float32).max)
# Seeds: what `jax.random.key` keeps (32 bits; a larger seed would alias a smaller one) and
# `np.random.default_rng` takes (non-negative).
SEED_MAXIMUM = 2**32 - 1
# Epoch counts: at most this many, so that epochs x steps per epoch (60,000 images at batch 1 and
# more) stays within int32, which the loop and the schedules count steps in.
EPOCH_MAXIMUM = 10_000


def field(default, help: str, choices: Sequence | None = None, *,  # noqa: A002
          minimum: float | None = None, above: float | None = None,
          maximum: float | None = None, below: float | None = None, **kwargs):
  """A config field with its flag's help text, choices and range, checked once when the command
  line is parsed: `minimum` <= value (or `above` < value) and value <= `maximum` (or value <
  `below`). An int or float field needs a lower bound; without an upper one an int is at most
  `INT_MAXIMUM` and a float at most `FLOAT_MAXIMUM`. A float must be finite (no nan, no inf)."""
  return dataclasses.field(default=default, metadata={
      "help": help, "choices": choices, "minimum": minimum, "above": above, "maximum": maximum,
      "below": below}, **kwargs)


def check_choice(name: str, value: str, known: Sequence[str], what: str = "") -> str:
  """`value` if it is one of `known`, else a one-line UserError listing them."""
  if value not in known:
    raise UserError(f"unknown {what or name} {value!r}; choose one of {', '.join(known)}")
  return value


def _number(x) -> str:
  return f"{x:g}" if isinstance(x, float) else str(x)


def _check_ranges(config_cls: type, values: dict) -> None:
  """A one-line UserError naming the first int or float flag whose value in `values` (field ->
  value; a field left out has its default) is outside its declared range (see `field`); a float
  flag must also be finite. Checked before `config_cls` is made, so its `__post_init__` sees
  only values in range."""
  hints = typing.get_type_hints(config_cls)
  for f in dataclasses.fields(config_cls):
    kind = hints.get(f.name)
    if kind not in (int, float):
      continue
    value = values.get(f.name, f.default)
    if value is dataclasses.MISSING:
      continue
    flag = "--" + f.name.replace("_", "-")
    if isinstance(value, float) and not math.isfinite(value):
      raise UserError(f"{flag} must be a finite number, got {value}")
    low, above = f.metadata.get("minimum"), f.metadata.get("above")
    high, below = f.metadata.get("maximum"), f.metadata.get("below")
    if high is None and below is None:
      high = INT_MAXIMUM if kind is int else FLOAT_MAXIMUM
    if low is not None and value < low:
      raise UserError(f"{flag} must be at least {_number(low)}, got {_number(value)}")
    if above is not None and value <= above:
      raise UserError(f"{flag} must be greater than {_number(above)}, got {_number(value)}")
    if high is not None and value > high:
      raise UserError(f"{flag} must be at most {_number(high)}, got {_number(value)}")
    if below is not None and value >= below:
      raise UserError(f"{flag} must be less than {_number(below)}, got {_number(value)}")


# Shared config groups: a job's config inherits the ones it uses, so every flag is defined once.
@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = field("mnist", "dataset (tfds name; mhist is read from --manual-dir)",
                       choices=tuple(DATASETS))
  manual_dir: str = field("", "offline: folder with <dataset>/ raw tfds files, or mhist/ "
                              "as published (or $KIP_MANUAL_DIR)")
  data_dir: str = field("", "where tfds keeps prepared datasets (or $KIP_DATA_DIR)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  seed: int = field(0, "seed of everything random (initialisation, batches, augmentation)",
                    minimum=0, maximum=SEED_MAXIMUM)
  workdir: str = field("", "run folder (default: a new folder under ./runs); re-use it to resume")
  progress: bool = field(True, "show a progress bar")


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
  memory_mb: float = field(0.0, "per-device memory budget for kernel tiles, in MiB (0: half of "
                                "each device's free memory; on CPU, of the available RAM)",
                           minimum=0, maximum=2**30)
  distributed: bool = field(False, "multi-host: call jax.distributed.initialize() (SLURM, Open "
                                   "MPI, TPU pods, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/"
                                   "JAX_PROCESS_ID); needs --workdir")


@dataclasses.dataclass(frozen=True)
class SetReadConfig:
  """How the jobs that read a set (evaluate, transfer, show) read another project's file."""

  layout: str = field("auto", "image layout of an imported set: auto (NCHW when the second "
                                  "axis has 1 or 3 entries and the last does not), nhwc or nchw",
                          choices=LAYOUTS)
  experiment: int = field(-1, "which experiment of a DC-style results file (res_*.pt: DC, "
                                  "DSA and the methods that share their code) to read (-1: the "
                                  "last)", minimum=-1)

  def load(self, path: str, dataset: str | None = None) -> DistilledSet:
    """The set at `path` in any format `kip.io.load_distilled` reads."""
    return load_distilled(path, dataset, layout=self.layout, experiment=self.experiment)


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
  """Checkpoint cadence and the validation split that picks the best set (with `--patience`),
  for the commands whose loop runs through `kip.pipeline.selecting_loop_config`."""

  checkpoint_every: int = field(100, "steps between checkpoints (and distilled.npz updates)",
                                minimum=1)
  patience: int = field(0, "with --val-size: stop once the validation accuracy has not "
                           "improved for this many steps (0: never); distilled_best.npz keeps "
                           "the best set", minimum=0)
  val_size: int = field(0, "hold out this many training images and evaluate on them instead of "
                           "test", minimum=0)


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):
    # One line instead of argparse's usage block; --help has the rest.
    raise UserError(f"{message} (see --help)")


_UNSET = object()


def parse_config(config_cls: type, argv: Sequence[str] | None, description: str,
                 positional: Sequence[str] = (), presets: dict[str, dict] | None = None):
  """Builds an argparse parser from `config_cls`'s fields and returns a `config_cls`.

  presets: name -> {field: value}; with a `preset` field in the config, the chosen preset's
  values replace the defaults of the fields the command line does not set.
  """
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  parser = _Parser(prog=f"python -m {spec.name}" if spec else None, description=description,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  hints = typing.get_type_hints(config_cls)
  for f in dataclasses.fields(config_cls):
    kind = hints[f.name]
    name = f.name if f.name in positional else "--" + f.name.replace("_", "-")
    default = f.default
    if presets and f.name != "preset":
      differ = {name: p[f.name] for name, p in presets.items()
                if f.name in p and p[f.name] != f.default}
      if differ:
        default = f"{f.default}; " + ", ".join(f"{k}: {v}" for k, v in differ.items())
    # One style for every command: "(default: X)", with each preset's own value where it
    # differs; an empty default says nothing (the help says what leaving it out means).
    shown = "" if default == "" else f" (default: {default})"
    kwargs = {"help": f.metadata.get("help", "") + shown,
              "default": _UNSET if presets else f.default}
    if f.name in positional:
      kwargs["nargs"] = "?"  # optional: the field's default applies when it is left out
    if kind is bool:
      kwargs["action"] = argparse.BooleanOptionalAction
    else:
      kwargs["type"] = kind if kind in (int, float, str) else str
      if f.metadata.get("choices"):
        kwargs["choices"] = f.metadata["choices"]
    action = parser.add_argument(name, **kwargs)
    action.help = kwargs["help"]  # Python 3.10's BooleanOptionalAction appends its own default
  given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not _UNSET}
  values = {}
  if presets:
    preset = given.get("preset", config_cls.__dataclass_fields__["preset"].default)
    values = dict(presets[preset])
  _check_ranges(config_cls, values | given)
  return config_cls(**(values | given))


_QUIET = False  # processes other than the first of a multi-host run do not log


def log(message: str) -> None:
  """Human-readable progress lines (metrics go to metrics.jsonl, not here)."""
  if not _QUIET:
    print(message, file=sys.stderr, flush=True)


def log_job(what: str, steps: int, detail: str = "") -> None:
  """The first line of a command made of several trainings sharing one progress bar (`span` of
  `kip.loop.run`): what they are and how many steps in all."""
  log(f"the job: {what}: {steps:,} steps{detail}; the progress bar counts all of them (its ETA: "
      "the job's remaining steps at the current rate)")


def is_writer() -> bool:
  """Whether this process writes files (the first process of a multi-host run)."""
  return not _QUIET


def report(message: str) -> None:
  """A job's result on stdout (once, from the first process)."""
  if not _QUIET:
    print(message, flush=True)


def percent(mean: float, std: float) -> str:
  """A fraction's mean and spread as `97.12 +- 0.34` (percent)."""
  return f"{100 * mean:.2f} +- {100 * std:.2f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A plain-text table: every column as wide as its widest cell, a rule under the header."""
  widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]
  text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True))
          for line in [header, *rows]]
  text.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(line.rstrip() for line in text)


def peak_rss_mib() -> float:
  """This process's peak resident memory so far, in MiB (host RAM: on CPU, device memory too)."""
  import resource  # noqa: PLC0415

  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, else KiB


def log_kernel_layouts(step_kernel: Callable, eval_kernel: Callable, n_support: int,
                       blocks: dict[str, int], image_shape, itemsize: int = 4) -> None:
  """One log line per kernel block: how an analytic kernel is tiled, or how a finite kernel is
  spread (by images, or unsharded). The kernels come from `kip.pipeline.shard_kernels`."""
  for what, n_rows in blocks.items():
    fn = eval_kernel if what.startswith("K(test") else step_kernel
    if hasattr(fn, "layout"):
      layout = fn.layout(n_rows, n_support, image_shape, itemsize)
      log(f"{what}: {n_rows} x {n_support} in tiles of {layout.tiles.rows} x "
          f"{layout.tiles.cols}, {layout.rows_per_device} rows per device"
          + (", recomputed in the backward pass" if layout.remat else ""))
    elif hasattr(fn, "mesh"):
      log(f"{what}: {n_rows} x {n_support} from features, images sharded over "
          f"{fn.mesh.size} device(s)")
    else:
      log(f"{what}: {n_rows} x {n_support} on one device (not sharded)")


def describe_devices() -> str:
  import jax  # noqa: PLC0415

  devices = jax.devices()
  hosts = f" on {jax.process_count()} processes" if jax.process_count() > 1 else ""
  return f"{len(devices)} x {devices[0].platform} ({devices[0].device_kind}){hosts}"


def log_devices(memory_bytes: float, workdir: str) -> None:
  log(f"devices: {describe_devices()}; kernel tiles within {memory_bytes / 2**20:.0f} MiB per "
      f"device; workdir: {workdir}")


def setup_devices(config) -> tuple:
  """Starts the multi-host runtime when `config.distributed`, and returns (mesh, per-device
  memory budget in bytes) from `config.memory_mb` (0: automatic)."""
  global _QUIET
  from kip import sharding  # noqa: PLC0415

  if config.distributed:
    if hasattr(config, "workdir") and not config.workdir:
      raise UserError("--distributed needs --workdir: a folder on a filesystem every process "
                      "can reach (process 0 writes, every process resumes from it)")
    try:
      sharding.initialize_distributed()
    except (RuntimeError, ValueError) as e:
      raise UserError(f"could not start the multi-host runtime: {e}") from e
  _QUIET = not sharding.is_main_process()
  memory = config.memory_mb * 2**20 if config.memory_mb else sharding.default_memory_bytes()
  return sharding.make_mesh(), memory


# Fields that never change what a run computes: paths, display and resources. Every comparison
# of a run's recorded settings (`prepare_workdir`, the benchmark's reuse of a finished cell)
# leaves them out.
NOT_SETTINGS = ("workdir", "manual_dir", "data_dir", "progress", "memory_mb", "distributed")


def prepare_workdir(config, job: str, name_parts: Sequence[str],
                    ignore: Sequence[str] = (*NOT_SETTINGS, "steps", "eval_every"),
                    inputs: dict[str, str] | None = None) -> str:
  """Creates the workdir (default: a new folder under ./runs) and writes or checks config.json.

  Re-running in a workdir that holds a run with other settings is refused (fields in `ignore`
  may differ: by default `NOT_SETTINGS`, the evaluation cadence, and `steps`, so a finished run
  can be extended).
  `inputs` (name -> path of an input file) are recorded by their content's digest
  (`file_digest`), and a different content is refused: the run's finished parts were made from
  another input. In a multi-host run only process 0 writes.
  """
  workdir = config.workdir or os.path.join(
      "runs", "-".join([job, *name_parts, datetime.datetime.now().strftime("%Y%m%d-%H%M%S")]))
  _check_writable_dir(workdir, "--workdir")
  current = dataclasses.asdict(config) | {"workdir": workdir, "job": job}
  digests = {name: file_digest(p) for name, p in (inputs or {}).items()}
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    changed = changed_inputs(previous, inputs or {}, digests)
    if changed:
      raise UserError(f"{workdir} holds a run made from another {', '.join(changed)} (its content "
                      "changed since); use a new --workdir for this one")
    differ = changed_settings(previous, current, config,
                              (*ignore, *content_compared(previous, inputs or {})))
    if differ:
      changes = describe_changes(previous, current, config, differ)
      raise UserError(f"{workdir} holds a run with other settings ({changes}); use a new "
                      "--workdir to start afresh")
  global _WORKDIR
  _WORKDIR = workdir
  if not _QUIET:
    if not os.path.isdir(workdir):
      _CREATED.append(workdir)
      parent = os.path.dirname(os.path.abspath(workdir))
      while not os.path.isdir(parent):  # deepest first
        _MADE_ABOVE.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(workdir, exist_ok=True)
    write_json(path, current | ({"inputs": digests} if digests else {}))
  return workdir


def changed_inputs(previous: dict, inputs: dict[str, str],
                   digests: dict[str, str] | None = None) -> list[str]:
  """The names in `inputs` (name -> path) whose file's content is not the one `previous` (a
  recorded config.json) was made from (an input it did not record counts as changed).
  `digests`: the inputs' `file_digest`s, if already computed."""
  recorded = previous.get("inputs", {})
  digests = digests or {name: file_digest(p) for name, p in inputs.items()}
  return [k for k, digest in digests.items() if recorded.get(k) != digest]


def content_compared(previous: dict, inputs: dict[str, str]) -> tuple[str, ...]:
  """The names in `inputs` that `previous` (a recorded config.json) recorded by their content:
  `changed_inputs` compares those, so their paths are not settings (the same file moved, or
  reached from another --root or as an absolute path, is the same input)."""
  return tuple(k for k in inputs if k in previous.get("inputs", {}))


def _recorded_defaults(config) -> dict:
  """What a recorded config without a field had: the field's default, or the value the config
  class's `RECORDED_BEFORE` mapping names for it (a flag whose default changed when it was
  added)."""
  defaults = {f.name: f.default for f in dataclasses.fields(config)}
  return defaults | getattr(type(config), "RECORDED_BEFORE", {})


def changed_settings(previous: dict, current: dict, config, ignore: Sequence[str]) -> list[str]:
  """The fields of `current` (a command's settings, from its `config` dataclass) not in `ignore`
  whose value `previous` (a recorded config.json) does not hold; a flag added after the run was
  recorded counts as having had the value `_recorded_defaults` gives."""
  defaults = _recorded_defaults(config)
  return [k for k in current if k not in ignore and previous.get(k, defaults.get(k)) != current[k]]


def describe_changes(previous: dict, current: dict, config, differ: Sequence[str]) -> str:
  """`name: recorded -> wanted, ...` of the settings `changed_settings` found."""
  defaults = _recorded_defaults(config)
  return ", ".join(f"{k}: {previous.get(k, defaults.get(k))!r} -> {current[k]!r}"
                   for k in differ)


_WORKDIR: str | None = None  # this command's workdir, for the resume hint after Ctrl-C
_CREATED: list[str] = []  # workdirs this command created; removed again if it fails at once
_MADE_ABOVE: list[str] = []  # folders made to hold them (./runs), deepest first


def file_digest(path: str) -> str:
  """A digest of a file's content, or '' when it does not exist (reported elsewhere).

  An `.npz` is digested by its arrays (names, dtypes, shapes, values: `npz:<sha256>`) except
  `config`, the record of the command line that wrote it, so saving the same set again (a
  finished run re-writes its output, maybe from a command with other display or path flags; zip
  entries carry the save time) keeps its digest; any other file by its bytes (`<sha256>`)."""
  if not os.path.isfile(path):
    return ""
  if path.endswith(".npz"):
    try:  # one array at a time, each checked before it is inflated (kip.readers)
      digest = hashlib.sha256()
      for name in sorted(set(npz_keys(path)) - {"config"}):
        a = np.ascontiguousarray(read_npz_arrays(path, [name])[name])
        digest.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        digest.update(a.tobytes())
      return "npz:" + digest.hexdigest()
    except FileFormatError:
      pass  # not a readable npz (or one whose arrays claim more than the file holds): its bytes
  return _bytes_digest(path)


def _bytes_digest(path: str) -> str:
  if not os.path.isfile(path):
    return ""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _check_writable_dir(path: str, flag: str) -> None:
  """One line when `path` cannot be a folder we write into: it is a file, lies under a file, or
  its nearest existing ancestor is not writable."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag} {path} is a file, not a folder")
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"{flag} {path} lies under {parent}, which is a file")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f"{flag} {path}: {parent} is not writable")


# The errnos of a file that cannot be written (full or over quota, read-only, not permitted):
# reported in one line, as the user's to fix.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM,
                 *([errno.EDQUOT] if hasattr(errno, "EDQUOT") else [])}
# Files that record a run without being its work: made again by a fresh start.
_NOT_WORK = ("config.json", "metrics.jsonl")


def _holds_work(workdir: str) -> bool:
  """Whether `workdir` (or a folder in it) holds a file that is finished work: a checkpoint, an
  output; not its config.json, its metrics.jsonl or a temporary `.tmp` file."""
  for _, _, files in os.walk(workdir):
    if any(name not in _NOT_WORK and not name.endswith(".tmp") for name in files):
      return True
  return False


def _remove_unfinished_workdirs() -> None:
  """A workdir this command created that holds no finished work (`_holds_work`) is removed, and
  then the folders made to hold it (./runs) if left empty: a command that failed before doing
  any work leaves no run folder behind, which would refuse its corrected re-run as a run with
  other settings."""
  import shutil  # noqa: PLC0415

  for workdir in _CREATED:
    try:
      if os.path.isdir(workdir) and not _holds_work(workdir):
        shutil.rmtree(workdir, ignore_errors=True)
    except OSError:
      pass  # unreadable: left as it is
  for folder in _MADE_ABOVE:
    try:
      os.rmdir(folder)  # only if empty: another command's run may be in it meanwhile
    except OSError:
      pass


def _fail(message: str, code: int) -> None:
  _remove_unfinished_workdirs()
  print(message, file=sys.stderr)
  sys.exit(code)


class Terminated(KeyboardInterrupt):
  """SIGTERM (a scheduler's stop, `kill`), raised where the command is, so it unwinds as after
  Ctrl-C: open files closed, finished work kept, the resume hint printed."""


def _terminate(signum, frame):
  raise Terminated


def run_main(main: Callable[[Sequence[str] | None], int | None]) -> None:
  """Runs a job's main: user errors and files that cannot be written (a full disk, a read-only
  folder) print one line and exit 2, running out of memory one line and exit 3, Ctrl-C (exit 130)
  and SIGTERM (exit 143) say where the finished work is and how to resume. A failure of any kind
  first removes the workdirs this command created that hold no finished work; unexpected errors
  then go on with their traceback."""
  previous = None
  if (threading.current_thread() is threading.main_thread()
      and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):  # a command's own handler stays
    previous = signal.signal(signal.SIGTERM, _terminate)
  try:
    _run_main(main)
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def _run_main(main: Callable[[Sequence[str] | None], int | None]) -> None:
  try:
    sys.exit(main(None) or 0)
  except USER_ERRORS as e:
    _fail(f"error: {e}", 2)
  except MemoryError as e:
    _fail(f"error: out of host memory ({e}); lower --memory-mb or the batch sizes", 3)
  except KeyboardInterrupt as e:
    terminated = isinstance(e, Terminated)
    what = "stopped by SIGTERM" if terminated else "interrupted"
    if _WORKDIR and _holds_work(_WORKDIR):
      what += (f"; its finished work is kept in {_WORKDIR}: re-run the same command with "
               f"--workdir {_WORKDIR} to resume")
    else:
      _remove_unfinished_workdirs()  # nothing finished: nothing to resume
    print(what, file=sys.stderr)
    sys.exit(128 + signal.SIGTERM if terminated else 130)
  except Exception as e:
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
      what = f"{e.filename}: {e.strerror}" if e.filename else str(e)
      full = e.errno not in (errno.EACCES, errno.EPERM)  # a denied read reads the same
      _fail(f"error: {'cannot write ' if full else ''}{what}", 2)
    if _is_out_of_memory(e):
      _fail(f"error: out of device memory: {_first_line(e)}; lower --memory-mb, the batch "
            "sizes or the network width", 3)
    _remove_unfinished_workdirs()
    raise


def _is_out_of_memory(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _first_line(e: Exception) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[0][:300] if lines else type(e).__name__
