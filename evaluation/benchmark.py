"""The benchmark table (`experiments.benchmark`'s job): cells planned across methods, datasets,
set sizes, protocols and networks, each made by this project's commands in a workdir of its own
and read back once finished; the table, its JSON and figure; the archive a fresh checkout reads
the table back from. See the command's --help for the layout of the cells.

The methods come from their commands: a method's flags, defaults and presets are its command's
`JOB` (`experiments.<method>`), so a new method joins the table by name (`--methods NAME`);
`METHODS` lists the ones it shows by default in --help and their expert stores.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import itertools
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

from kip import cli
from kip.command import Job
from kip.io import atomic_write, write_json
from methods.coreset import SELECTIONS
from methods.nets import NETS
from methods.protocols import PROTOCOLS

f = cli.field
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = os.path.join(ROOT, "bench", "published.json")

# The methods the table can show (--methods), in the order --help lists them: each has a command
# `experiments.<name>` that writes <workdir>/distilled.npz with labels. The value: None, or the
# flags of `experiments.buffer` that make the expert store the method trains on (the trajectory
# methods; made before the method runs). Everything else (its flags, whether it takes --preset)
# is read from the command's JOB.
METHODS = {"kip": None, "label_solve": None, "frepo": None, "rfad": None, "dm": None,
           "datadam": None, "mtt": {}, "datm": {}, "pad": {"curriculum": "pad"}}

# Each method's own paper's evaluation (`--protocol paper`): KIP and Label Solve the KIP authors'
# (MSE on the learned labels, width 1024), FRePo's and RFAD's own, DM, DataDAM and the trajectory
# methods DSA's (ConvNet-3 of width 128, DSA augmentation; a set's learned learning rate and soft
# labels are used by `experiments.transfer` as the set carries them). A method not listed: `dc`.
PAPER_PROTOCOLS = {"kip": "kip", "label_solve": "kip", "frepo": "frepo", "rfad": "rfad",
                   "dm": "dsa", "datadam": "dsa", "mtt": "dsa", "datm": "dsa", "pad": "dsa"}

FULL_STEPS = 2000  # the full-data row's default budget (8.5 epochs of MNIST at batch 256)
FINAL = "final_metrics.json"  # an archived set's summary of its metrics.jsonl
ARCHIVED_SET_BYTES = 100_000  # larger sets stay in --root (the repository keeps small files)
BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"


@dataclasses.dataclass(frozen=True)
class Config:
  methods: str = f("dm,datadam", "comma-separated methods to distil and evaluate: "
                                 + ", ".join(METHODS) + " (empty: none)")
  dataset: str = f("mnist", "comma-separated datasets (tfds names)")
  ipc: str = f("1,10", "comma-separated images per class")
  sets: str = f("", "comma-separated distilled files to evaluate beside the methods, in any "
                    "format kip.io reads (name=path to name a row); their dataset and size come "
                    "from the file")
  coresets: str = f("random,herding,kcenter", "coreset rows (" + ", ".join(SELECTIONS)
                    + "; empty: none)")
  full: bool = f(True, "a row trained on the whole training split (capped at --full-steps)")
  full_steps: int = f(FULL_STEPS, "step budget of the full-data row (another budget is a row "
                                  "of its own: <root>/full-<dataset>-steps<N>)", minimum=1)
  full_seeds: int = f(1, "networks of the full-data row", minimum=1)
  protocol: str = f("dc", "comma-separated evaluation protocols: " + ", ".join(PROTOCOLS)
                    + "; paper: each method's own paper's (kip: kip, label_solve: kip, frepo, "
                    "rfad, dsa for dm, datadam, mtt, datm and pad; the coresets and the full "
                    "split under each of them)")
  nets: str = f("auto", "comma-separated evaluation networks (auto: the protocol's; e.g. "
                        "auto,mlp,resnet18 for cross-architecture columns): "
                        + ", ".join(NETS))
  seeds: int = f(5, "networks per cell (mean +- std reported)", minimum=1)
  preset: str = f("cpu", "cpu (each method's CPU preset, published evaluation schedules) or "
                         "paper (every command at --preset paper)", choices=("cpu", "paper"))
  root: str = f("runs/benchmark", "workdirs of every cell")
  out: str = f("", "where the table, JSON and figure go (default: --root)")
  archive: str = f("", "a folder (e.g. <out>/cells, committed) that keeps each finished cell's "
                       "summary (its evaluations' transfer.json and config.json; a distilled "
                       "set's config.json, final metrics and, up to 100 kB, distilled.npz), "
                       "from which a fresh checkout reads the table back")
  readme: str = f("", "also replace the table between `<!-- benchmark:begin -->` and "
                      "`<!-- benchmark:end -->` in this markdown file (e.g. docs/results.md)")
  method_args: str = f("", "extra flags per method, `method=--flag value;method2=...`")
  transfer_args: str = f("", "extra flags for every evaluation (experiments.transfer)")
  fair: bool = f(False, "also the evaluations of the fair scores (DD-Ranking): each method's "
                        "and imported set's with hard labels (--labels hard) and without "
                        "augmentation (--augment none), the random rows without augmentation; "
                        "the table then adds the label- and augmentation-robust scores")
  workers: int = f(1, "cells run at once on this machine (each its own processes)", minimum=1)
  slurm: str = f("", "write a SLURM job-array script to this file (one cell per array task, "
                     "--cell $SLURM_ARRAY_TASK_ID) and run nothing; submit it with `sbatch "
                     "[resources] FILE`, then run this command with --table-only")
  cell: int = f(-1, "run only the cell at this index of the plan (0-based, as --dry-run and "
                    "--slurm number them) and write no table; -1: every cell", minimum=-1)
  dry_run: bool = f(False, "list the commands that would run, run none")
  table_only: bool = f(False, "run nothing: write the table, JSON, figure (and --readme) from "
                              "the cells finished so far, read back from --root or --archive, "
                              "and list the cells still to run")
  progress: bool = f(True, "progress bars of the commands run")
  manual_dir: str = f("", "offline: folder with <dataset>/ raw tfds files (or $KIP_MANUAL_DIR)")
  data_dir: str = f("", "where tfds keeps prepared datasets (or $KIP_DATA_DIR)")

  @property
  def runs_nothing(self) -> bool:
    """--dry-run or --table-only: no command runs and nothing is archived."""
    return self.dry_run or self.table_only


@dataclasses.dataclass(frozen=True)
class Cell:
  """One set to evaluate: `kind` method | set | coreset | full."""

  kind: str
  name: str
  dataset: str
  ipc: int
  workdir: str
  support: str
  recorded: float | None = None  # an imported file's own accuracy (DC's accs_all_exps), %

  def label(self) -> str:
    return f"{self.name} {self.dataset}" + (f" ipc {self.ipc}" if self.ipc else "")


def _split(text: str) -> list[str]:
  return [t for t in (s.strip() for s in text.split(",")) if t]


def _is_method_command(name: str) -> bool:
  """Whether `experiments.<name>` is a distiller's command (a JOB whose config takes --ipc): any
  method joins the table by name, not only those `METHODS` lists by default."""
  if not name.isidentifier() or importlib.util.find_spec(f"experiments.{name}") is None:
    return False
  job = getattr(importlib.import_module(f"experiments.{name}"), "JOB", None)
  return job is not None and "ipc" in {f.name for f in dataclasses.fields(job.config)}


def check(config: Config) -> None:
  """Every list flag checked against what exists, before any work."""
  from kip.data import DATASETS  # noqa: PLC0415

  for name in _split(config.methods):
    if name not in METHODS and not _is_method_command(name):
      cli.check_choice("method", name, tuple(METHODS))  # one line listing the table's methods
  for name in _split(config.dataset):
    cli.check_choice("dataset", name, tuple(DATASETS))
  for name in _split(config.coresets):
    cli.check_choice("coreset", name, SELECTIONS)
  for name in _split(config.protocol):
    cli.check_choice("protocol", name, ("paper", *PROTOCOLS))
  for name in _split(config.nets):
    cli.check_choice("net", name, ("auto", *NETS))
  for value in _split(config.ipc):
    if not value.isdigit() or not 1 <= int(value) <= 100_000:
      raise cli.UserError(f"--ipc takes integers from 1 to 100000, got {value!r}")
  for item in _split(config.sets):
    path = item.partition("=")[2] or item
    if not os.path.exists(path):
      raise cli.UserError(f"--sets: {path}: no such file")
  if not (_split(config.methods) or _split(config.sets) or _split(config.coresets)
          or config.full):
    raise cli.UserError("nothing to benchmark: give --methods, --sets, --coresets or --full")
  if config.readme:
    replace_block(config.readme)


def plan(config: Config) -> list[Cell]:
  """The cells in the order they run: per dataset, per size, methods then coresets; imported
  sets; the full split last."""
  from kip.io import load_distilled  # noqa: PLC0415

  cells = []
  for dataset in _split(config.dataset):
    for ipc in (int(v) for v in _split(config.ipc)):
      for method in _split(config.methods):
        workdir = os.path.join(config.root, f"{method}-{dataset}-ipc{ipc}")
        cells.append(Cell("method", method, dataset, ipc, workdir,
                          os.path.join(workdir, "distilled.npz")))
      for select in _split(config.coresets):
        workdir = os.path.join(config.root, f"coreset-{select}-{dataset}-ipc{ipc}")
        cells.append(Cell("coreset", select, dataset, ipc, workdir,
                          os.path.join(workdir, "distilled.npz")))
  for item in _split(config.sets):
    name, _, path = item.partition("=")
    path = path or item
    if path == item:  # unnamed: the file's folder and stem (images_best.pt alone says little)
      folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
      stem = os.path.splitext(os.path.basename(path))[0]
      name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{folder}-{stem}")
    distilled = load_distilled(path)
    if distilled.dataset is None:
      raise cli.UserError(f"--sets: {path} does not say its dataset; give it as a file of ours "
                          "or one whose name or folder names the dataset")
    num_classes = distilled.labels.shape[1]
    accs = distilled.source.published.get("ConvNet", []) if distilled.source else []
    recorded = float(np.mean(accs)) if accs else None
    if recorded is not None and recorded <= 1:  # DC records fractions
      recorded *= 100
    cells.append(Cell("set", name, distilled.dataset, len(distilled.images) // num_classes,
                      os.path.join(config.root, f"imported-{name}"), path, recorded))
  if config.full:
    for dataset in _split(config.dataset) or sorted({c.dataset for c in cells}):
      budget = "" if config.full_steps == FULL_STEPS else f"-steps{config.full_steps}"
      workdir = os.path.join(config.root, f"full-{dataset}{budget}")
      cells.append(Cell("full", "full", dataset, 0, workdir,
                        os.path.join(workdir, "support", "distilled.npz")))
  return cells


VARIANTS = {"": [], "hard": ["--labels", "hard"], "noaug": ["--augment", "none"]}


def evaluations(config: Config, cell: Cell | None = None) -> list[tuple[str, str, str]]:
  """(protocol, net, variant) of every evaluation of `cell`, in the table's order. Variant ""
  is the evaluation as the protocol has it; with --fair, "hard" (the set's labels replaced by
  class labels) for methods and imported sets, and "noaug" (no augmentation) for those and the
  random rows: what the label- and augmentation-robust scores compare."""
  variants = [""]
  if config.fair and cell is not None and cell.kind in ("method", "set"):
    variants += ["hard", "noaug"]
  elif config.fair and cell is not None and (cell.kind, cell.name) == ("coreset", "random"):
    variants += ["noaug"]
  return [(p, n, v) for p in protocols(config, cell) for n in _split(config.nets)
          for v in variants]


def protocols(config: Config, cell: Cell | None = None) -> list[str]:
  """--protocol with `paper` made each method's own (`PAPER_PROTOCOLS`): a method's cell is
  evaluated under its paper's protocol, an imported set under its family's (DSA's for the DC
  family and the trajectory methods, else `dc`), the coresets and the full split under every
  paper protocol of the table's methods, so that each method's row has its random and full rows
  evaluated the same way."""
  out = []
  for name in _split(config.protocol):
    if name != "paper":
      out.append(name)
    elif cell is not None and cell.kind == "method":
      out.append(PAPER_PROTOCOLS.get(cell.name, "dc"))
    elif cell is not None and cell.kind == "set":
      out.append("dsa" if cell.name and _imported_family(cell) else "dc")
    else:
      out += [PAPER_PROTOCOLS.get(m, "dc") for m in _split(config.methods)] or ["dc"]
  return list(dict.fromkeys(out))


def _imported_family(cell: Cell) -> bool:
  """Whether an imported set comes from the DC family or a trajectory method (their papers
  evaluate with DSA's protocol): a DC results file, or MTT/DATM/PAD's images_best."""
  name = os.path.basename(cell.support)
  return name.startswith("res_") or name.startswith("images_")


# Running commands

# How a command starts on Linux: SIGTERM to it when the thread that started it ends, however it
# ends (SIGKILL of the benchmark too): PR_SET_PDEATHSIG, which exec keeps; exit at once if that
# thread is already gone. (Set here rather than in a preexec_fn: forking a multithreaded process
# to run Python code in the child can deadlock, and JAX warns of it.)
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
                    "os.getppid() == int(sys.argv[1]) or os._exit(1); "
                    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


class Runner:
  """Runs this project's commands as subprocesses, from any thread (`runs_nothing`: lists them);
  `stop()` ends the ones running and starts no more."""

  def __init__(self, config: Config):
    self.config, self.ran, self.stopped, self.held = config, [], False, threading.local()
    self.extra = ((["--manual-dir", config.manual_dir] if config.manual_dir else [])
                  + (["--data-dir", config.data_dir] if config.data_dir else [])
                  + ([] if config.progress else ["--no-progress"]))
    self._children, self._lock = set(), threading.Lock()

  def __call__(self, module: str, *args: str) -> None:
    """Runs `python -m module args` to its end; it inherits the locks its thread holds, so they
    are let go only once it is gone too."""
    argv = [module, *args, *self.extra]
    line = "python -m " + shlex.join(argv)
    self.ran.append(line)
    if self.config.runs_nothing:  # --dry-run: the plan is the report, printed once
      return
    cli.log(f"$ {line}")
    with self._lock:
      if self.stopped:
        raise cli.UserError(f"not started, the benchmark is stopping: {line}")
      launch = ("-c", _DIE_WITH_PARENT, str(os.getpid())) if sys.platform == "linux" else ()
      child = subprocess.Popen([sys.executable, *launch, "-m", *argv],
                               pass_fds=getattr(self.held, "fds", ()))
      self._children.add(child)
    try:
      code = child.wait()
    finally:  # left early (Ctrl-C, SIGTERM in this thread): the command is stopped too
      _end(child)
      with self._lock:
        self._children.discard(child)
    if code:
      raise cli.UserError(f"failed (exit {code}): {line}")

  def stop(self) -> None:
    with self._lock:
      self.stopped, children = True, list(self._children)
    for child in children:
      _end(child)


def _end(child: subprocess.Popen) -> None:
  """Terminates `child` if it runs (SIGTERM: it stops at its last checkpoint); killed after 30 s."""
  if child.poll() is None:
    child.terminate()
    try:
      child.wait(timeout=30)
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()


@contextlib.contextmanager
def held(folder: str, run: Runner):
  """Holds `folder`'s lock (`.locks/<name>.lock` beside it), waiting while another process or
  worker holds it. The commands `run` starts meanwhile in this thread inherit it: it is let go
  once this process and they have all closed it (a benchmark killed outright keeps its cell
  locked until its command has died too). Nothing is locked when nothing runs."""
  if run.config.runs_nothing:
    yield
    return
  import fcntl  # noqa: PLC0415

  path = os.path.join(os.path.dirname(os.path.abspath(folder)), ".locks",
                      os.path.basename(os.path.normpath(folder)) + ".lock")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as handle:  # closed, never unlocked: a command inheriting it keeps it
    for waited in itertools.count():
      try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if run.stopped:
          raise cli.UserError(f"stopped while waiting for {folder}") from None
        if waited == 0:
          cli.log(f"{folder}: another benchmark process or worker is on it; waiting")
        time.sleep(1)
    fds = getattr(run.held, "fds", ())
    run.held.fds = (*fds, handle.fileno())
    try:
      yield
    finally:
      run.held.fds = fds


# Reading cells back

def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def last_metrics(workdir: str) -> dict:
  """The latest value of every metric in `workdir`/metrics.jsonl (an archived set: its
  final_metrics.json; {} without either)."""
  latest = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return _read_json(os.path.join(workdir, FINAL)) or {}
  with open(path) as f:
    for line in f:
      if line.strip():
        latest.update(json.loads(line))
  return latest


def distillation_finished(workdir: str, steps: int | None = None) -> bool:
  """Whether `workdir` holds a finished run: its set (an archived one: its final metrics), and
  its last step at `steps` (default: its configured steps; a run without steps is finished once
  its set exists)."""
  if not any(os.path.exists(os.path.join(workdir, n)) for n in ("distilled.npz", FINAL)):
    return False
  recorded = _read_json(os.path.join(workdir, "config.json")) or {}
  steps = recorded.get("steps") if steps is None else steps
  return not steps or last_metrics(workdir).get("step", -1) >= steps


# Fields of a command's config that do not change what a finished run made: cli.NOT_SETTINGS
# (paths, display, resources), the cadences, how seeds are batched, which baseline rows an
# evaluation adds; and the seeds of an evaluation, whose report is read back when it holds at least
# the networks asked for.
_NOT_SETTINGS = frozenset({*cli.NOT_SETTINGS, "eval_every", "checkpoint_every", "seeds_at_once",
                           "seed_batching", "baselines", "distilled", "seeds"})


def command_settings(module: str) -> tuple[type, dict | None]:
  """The config dataclass and the presets (None: it takes no --preset) of the command
  `python -m module`: its `JOB`'s (a command not generated from a Job: its `Config`, `PRESETS`)."""
  command = importlib.import_module(module)
  job = getattr(command, "JOB", None)
  if job is not None:
    return job.config, job.presets
  return command.Config, getattr(command, "PRESETS", None)


def check_settings(workdir: str, module: str, args: Sequence[str],
                   ignore: Sequence[str] = (), inputs: dict[str, str] | None = None):
  """The config `python -m module args` runs with; refuses (one line) when `workdir` holds a run
  recorded with other settings, so that a finished cell is never read back for a request it
  does not answer (e.g. a set distilled with another kernel, or evaluated with another width).
  A flag added after the run was recorded counts as having had its default then. `inputs`
  (name -> path, as the command records them): refused too when the run was made from another
  content of one of them (e.g. an evaluation of a set that has since been distilled further)."""
  config_cls, presets = command_settings(module)
  try:
    wanted = cli.parse_config(config_cls, list(args), "", presets=presets)
  except SystemExit as e:  # argparse has printed why
    raise cli.UserError(f"bad flags for {module}: {' '.join(args)}") from e
  recorded = _read_json(os.path.join(workdir, "config.json"))
  if recorded is not None:
    changed = cli.changed_inputs(recorded, inputs or {})
    if changed:
      raise cli.UserError(f"{workdir} holds a {module.rsplit('.', 1)[-1]} run made from another "
                          f"{', '.join(changed)} (its content changed since); remove it to redo "
                          "it")
    current = dataclasses.asdict(wanted)
    differ = cli.changed_settings(recorded, current, wanted, _NOT_SETTINGS | set(ignore)
                                  | set(cli.content_compared(recorded, inputs or {})))
    if differ:
      changes = cli.describe_changes(recorded, current, wanted, differ)
      raise cli.UserError(f"{workdir} holds a {module.rsplit('.', 1)[-1]} run with other "
                          f"settings ({changes}); use another --root, or remove it to redo it")
  return wanted


def archived(path: str, config: Config) -> str:
  """Where --archive keeps `path` (under --root)."""
  return os.path.join(config.archive, os.path.relpath(path, config.root))


def locate(path: str, config: Config) -> str:
  """`path` (under --root) if it exists, else its archived copy if that exists, else `path`."""
  kept = archived(path, config) if config.archive else path
  return kept if not os.path.exists(path) and os.path.exists(kept) else path


def set_command(cell: Cell, config: Config) -> tuple[str, list[str]] | None:
  """(module, args) of the command that makes the cell's set (None: an imported file)."""
  if cell.kind == "set":
    return None
  if cell.kind in ("coreset", "full"):  # the full row's: a random set that sizes its network
    select, ipc = (cell.name, cell.ipc) if cell.kind == "coreset" else ("random", 1)
    return "experiments.coreset", ["--dataset", cell.dataset, "--ipc", str(ipc), "--select",
                                   select, "--workdir", os.path.dirname(cell.support)]
  extra = dict(item.partition("=")[::2] for item in config.method_args.split(";") if item.strip())
  module = f"experiments.{cell.name}"
  return module, [
      "--dataset", cell.dataset, "--ipc", str(cell.ipc), "--workdir", cell.workdir,
      *(["--preset", config.preset] if command_settings(module)[1] else []),
      *shlex.split({k.strip(): v for k, v in extra.items()}.get(cell.name, ""))]


def transfer_dir(cell: Cell, protocol: str, net: str, variant: str = "") -> str:
  return os.path.join(cell.workdir, f"transfer-{protocol}" + ("" if net == "auto" else f"-{net}")
                      + (f"-{variant}" if variant else ""))


def transfer_command(cell: Cell, protocol: str, net: str, config: Config,
                     variant: str = "") -> list[str]:
  full = cell.kind == "full"
  rows = (["--no-distilled", "--baselines", "full", "--full-steps", str(config.full_steps)]
          if full else ["--baselines", "none"])
  return ["--support", cell.support, "--dataset", cell.dataset, "--protocol", protocol,
          "--net", net, "--seeds", str(config.full_seeds if full else config.seeds),
          "--preset", config.preset, "--workdir", transfer_dir(cell, protocol, net, variant),
          *rows, *shlex.split(config.transfer_args), *VARIANTS[variant]]


def read_cell(cell: Cell, config: Config) -> tuple[int | None, bool, dict]:
  """What of `cell` is finished, in --root or else the archive: (the steps its set is asked
  for, whether that set is finished, {(protocol, net, variant): (the row of its transfer.json,
  the folder read), or None}). Evaluations are read with the settings and at least the
  networks asked for, a method's only once its set is finished; a record with other settings is
  refused."""
  steps, finished, command = None, True, set_command(cell, config)
  if command:  # `steps` may grow: a finished run is then extended by its own command
    source = locate(os.path.dirname(cell.support), config)
    steps = getattr(check_settings(source, *command, ignore=("steps",)), "steps", None)
    finished = distillation_finished(source, steps)
  full = cell.kind == "full"
  # The full row's support only sizes its network; a set kept nowhere (a coreset, a large set)
  # cannot be compared by content, and its path is no setting.
  support = locate(cell.support, config)
  inputs = None if full or not os.path.exists(support) else {"support": support}
  name, seeds = ("full", config.full_seeds) if full else ("distilled", config.seeds)
  found = dict.fromkeys(evaluations(config, cell))
  for protocol, net, variant in found if finished or cell.kind != "method" else ():
    source = os.path.dirname(locate(os.path.join(transfer_dir(cell, protocol, net, variant),
                                                 "transfer.json"), config))
    check_settings(source, "experiments.transfer",
                   transfer_command(cell, protocol, net, config, variant),
                   ignore=("support",) if inputs is None else (), inputs=inputs)
    rows = (_read_json(os.path.join(source, "transfer.json")) or {}).get("rows", [])
    found[protocol, net, variant] = next(((r, source) for r in rows
                                          if r["row"] == name and len(r["seeds"]) >= seeds), None)
  return steps, finished, found


def run_cell(cell: Cell, config: Config, run: Runner, made: set[str]) -> None:
  """Makes what `cell` is missing (read again once its lock is held): its set, unless every
  evaluation that needs it is read back (an archived set is restored, not remade), after the
  expert store it needs; its evaluations. Each folder made goes into `made`, the cell's
  summaries into --archive."""
  with held(cell.workdir, run):
    steps, _, found = read_cell(cell, config)
    missing = [k for k, v in found.items() if v is None]
    command = set_command(cell, config)
    if missing and command and not distillation_finished(
        os.path.dirname(cell.support), steps) and not restore(cell, config):
      flags = METHODS.get(cell.name) if cell.kind == "method" else None
      if flags is not None:  # its expert store first
        from methods.experts import default_buffer  # noqa: PLC0415

        with held(default_buffer(cell.dataset, config.preset, **flags), run):
          run("experiments.buffer", "--dataset", cell.dataset, "--preset", config.preset,
              *(a for k, v in flags.items() for a in (f"--{k}", v)))
      run(command[0], *command[1])
      made.add(cell.workdir)
    for key in missing:
      if read_cell(cell, config)[2][key] is None:  # read again: its set may be new
        run("experiments.transfer", *transfer_command(cell, *key[:2], config, key[2]))
        made.add(transfer_dir(cell, *key))
  archive(cell, config)


# The archive: summaries only

def archive(cell: Cell, config: Config) -> None:
  """Copies `cell`'s finished summaries into --archive (see the module's docstring); files whose
  bytes are unchanged are not rewritten."""
  if not config.archive or config.runs_nothing:
    return
  for key in evaluations(config, cell):
    tdir = transfer_dir(cell, *key)
    if os.path.exists(os.path.join(tdir, "transfer.json")):
      for name in ("config.json", "transfer.json"):
        _keep(os.path.join(tdir, name), archived(tdir, config))
  if cell.kind == "method" and distillation_finished(cell.workdir):
    target = archived(cell.workdir, config)
    _keep(os.path.join(cell.workdir, "config.json"), target)
    _write(os.path.join(target, FINAL),
           json.dumps(last_metrics(cell.workdir), indent=1).encode() + b"\n")
    if os.path.getsize(cell.support) <= ARCHIVED_SET_BYTES:
      _keep(cell.support, target)


def restore(cell: Cell, config: Config) -> bool:
  """Copies an archived set (distilled.npz, config.json, its final metrics as metrics.jsonl)
  into --root when its workdir does not exist there (a fresh checkout); whether it did."""
  kept = archived(cell.workdir, config) if config.archive else ""
  if (cell.kind != "method" or config.runs_nothing or os.path.exists(cell.workdir)
      or not os.path.exists(os.path.join(kept, "distilled.npz"))):
    return False
  for name in ("distilled.npz", "config.json"):
    _keep(os.path.join(kept, name), cell.workdir)
  _write(os.path.join(cell.workdir, "metrics.jsonl"),
         json.dumps(last_metrics(kept)).encode() + b"\n")
  cli.log(f"restored {cell.workdir} from {kept}")
  return True


def _keep(path: str, folder: str) -> None:
  with open(path, "rb") as f:
    _write(os.path.join(folder, os.path.basename(path)), f.read())


def _write(path: str, content: bytes) -> None:
  if os.path.isfile(path):
    with open(path, "rb") as f:
      if f.read() == content:
        return
  atomic_write(path, content)


# The benchmark

@functools.cache
def _published() -> dict:
  with open(PUBLISHED) as f:
    return {(p["method"], p["dataset"], p["ipc"]): p for p in json.load(f)["figures"]}


def published(cell: Cell, net: str) -> tuple[float | None, str]:
  """The published figure (bench/published.json) for the cell's method, dataset and size, and
  the evaluation it was measured under; none for another architecture (every published figure
  is a ConvNet's)."""
  figure = _figure(cell, net)
  return (figure["value"], figure["evaluation"]) if figure else (None, "")


def _figure(cell: Cell, net: str) -> dict | None:
  if net.startswith(("mlp", "resnet")):
    return None
  if cell.recorded is not None:  # DC/DSA/DM results files: their own ConvNet-3 evaluation
    return {"value": cell.recorded, "evaluation": "the authors', recorded in the file (ConvNet)",
            "protocol": ("dc", "dsa"), "width": 128}
  return _published().get(("full" if cell.kind == "full" else cell.name, cell.dataset,
                           cell.ipc or None))


def comparable(figure: dict | None, protocol: str, net: str) -> bool:
  """Whether a row evaluated under `protocol` with `net` (e.g. convnet3-128) measures what the
  published `figure` measured: its protocol, on the protocol's own network at the figure's
  width. Only then is the difference a gap."""
  if not figure or not figure.get("protocol"):
    return False
  protocols = figure["protocol"]
  protocols = protocols if isinstance(protocols, tuple | list) else (protocols,)
  return protocol in protocols and net == f"{PROTOCOLS[protocol].net}-{figure['width']}"


def table_row(cell: Cell, protocol: str, net: str, found: tuple[dict, str], set_status: str,
              evaluated: str, costs: dict) -> dict:
  """The table's row of one evaluation (`found`: its transfer.json row and folder): accuracy
  with its 95% interval over the networks, the published figure and, where it was measured under
  the same evaluation, the gap; the set's `costs` (`cell_costs`) and its evaluation's CPU time.
  `add_over_random` fills the improvement over random once every row is read."""
  from kip.scores import interval95  # noqa: PLC0415

  row, source = found
  net_name = f"{row['net']}-{row['width']}"
  figure = _figure(cell, row["net"])
  acc = 100 * row["test_acc_mean"]
  same = comparable(figure, protocol, net_name)
  return {
      "kind": cell.kind, "method": cell.name, "dataset": cell.dataset, "ipc": cell.ipc,
      "protocol": protocol, "net": net_name, "seeds": row["seeds"],
      "test_acc": row["test_acc"], "test_acc_mean": row["test_acc_mean"],
      "test_acc_std": row["test_acc_std"], "test_acc_ci95": interval95(row["test_acc"]).half,
      "train_time": row["train_time"],
      "train_time_per_net": row["train_time"] / max(len(row["seeds"]), 1),
      "steps": row["steps"], "images_per_net": row["steps"] * min(
          PROTOCOLS[protocol].batch_size, row["n_images"]),
      "published": figure["value"] if figure else None,
      "published_protocol": figure["evaluation"] if figure else "",
      "gap": acc - figure["value"] if same else None,
      "comparable": same, "over_random": None,
      **costs, "eval_cpu_time": row.get("cpu_time"),
      "set": cell.support, "workdir": source, "set_status": set_status,
      "evaluation_status": evaluated}


def cell_costs(cell: Cell, config: Config) -> dict:
  """What a cell's set costs, the same for every evaluation of it (read once per cell): its
  storage and its distillation's wall and CPU time."""
  distil = last_metrics(locate(cell.workdir, config)) if cell.kind == "method" else {}
  return {"storage": storage(cell, config), "distil_wall_time": distil.get("wall_time"),
          "distil_cpu_time": distil.get("cpu_time")}


def storage(cell: Cell, config: Config) -> dict | None:
  """`kip.scores.storage_bytes` of the cell's set (None: the full split, or a set kept
  nowhere)."""
  from kip.io import FileFormatError, load_distilled  # noqa: PLC0415
  from kip.scores import storage_bytes  # noqa: PLC0415

  path = locate(cell.support, config)
  if cell.kind == "full" or not os.path.exists(path):
    return None
  try:
    distilled = load_distilled(path)
  except FileFormatError:
    return None
  pre = distilled.preprocessor.to_arrays() if distilled.preprocessor else {}
  return storage_bytes(distilled.images, distilled.labels, distilled.extras, pre)


def add_over_random(rows: list[dict]) -> None:
  """Each row's improvement over the random real subset of the same size evaluated the same
  way (the `random` coreset row of its dataset, size, protocol and network), in points."""
  random = {(r["dataset"], r["ipc"], r["protocol"], r["net"]): r for r in base_rows(rows)
            if r["kind"] == "coreset" and r["method"] == "random"}
  for r in base_rows(rows):
    base = random.get((r["dataset"], r["ipc"], r["protocol"], r["net"]))
    if base is not None and r is not base and r["kind"] != "full":
      r["over_random"] = 100 * (r["test_acc_mean"] - base["test_acc_mean"])


def base_rows(rows: list[dict]) -> list[dict]:
  """The rows of the evaluations as their protocols have them (no --fair variant)."""
  return [r for r in rows if not r.get("variant")]


def add_robust_scores(rows: list[dict]) -> None:
  """DD-Ranking's scores (`kip.scores`) on each method's and imported set's row, where the
  benchmark has what they compare (--fair): the label-robust score from the set under its own
  labels and under hard labels, the random real subset of its size, and the full split (hard
  labels), all under the row's protocol and network; the augmentation-robust score from the set
  and the random subset with the protocol's augmentation and without it. The random subset
  carries hard labels: no teacher relabels it, so a set's learned labels count in its IOR."""
  from kip.scores import augmentation_robust_score, label_robust_score  # noqa: PLC0415

  index = {(r["kind"], r["method"], r["dataset"], r["ipc"], r["protocol"], r["net"],
            r.get("variant", "")): r for r in rows}
  for r in base_rows(rows):
    if r["kind"] not in ("method", "set"):
      continue
    where = (r["dataset"], r["ipc"], r["protocol"], r["net"])
    hard = index.get((r["kind"], r["method"], *where, "hard"))
    plain = index.get((r["kind"], r["method"], *where, "noaug"))
    random = index.get(("coreset", "random", *where, ""))
    random_plain = index.get(("coreset", "random", *where, "noaug"))
    full = index.get(("full", "full", r["dataset"], 0, r["protocol"], r["net"], ""))
    acc = lambda row: row["test_acc_mean"]  # noqa: E731
    if hard and random and full:
      r["hard_acc"] = acc(hard)
      r["lrs"] = label_robust_score(acc(full), acc(hard), acc(r), acc(random))
    if plain and random and random_plain:
      r["noaug_acc"] = acc(plain)
      r["ars"] = augmentation_robust_score(acc(r), acc(random), acc(plain), acc(random_plain))


def run_benchmark(config: Config) -> dict:
  """Plans the cells, runs what is missing (all of them, or --cell's), and reads every cell back
  into the table; {} for --slurm and --cell, which write no table."""
  check(config)
  cells = plan(config)
  if config.slurm:
    write_slurm(config, cells)
    return {}
  if config.cell >= len(cells):
    raise cli.UserError(f"--cell {config.cell}: the plan has {len(cells)} cells (0 to "
                        f"{len(cells) - 1})")
  chosen = cells if config.cell < 0 else [cells[config.cell]]
  run, made = Runner(config), set()
  if not config.table_only:
    # Read back first: a finished cell recorded with other settings is refused before any runs.
    todo = [c for c in chosen if None in read_cell(c, config)[2].values()]
    if todo:
      run_cells(todo, cells, config, run, made)
    for cell in chosen:  # finished before, maybe not archived yet
      archive(cell, config)
  if config.cell >= 0 or config.dry_run:
    return {"commands_run": run.ran}
  rows, pending = [], []
  for cell in cells:
    _, finished, found = read_cell(cell, config)
    set_status = ("made" if cell.workdir in made else "reused" if finished
                  else "pending" if cell.kind == "method" else "not kept")
    costs = cell_costs(cell, config) if any(found.values()) else {}
    for (protocol, net, variant), answer in found.items():
      if answer is None:
        pending.append(f"{cell.label()} {protocol} {net}" + (f" {variant}" if variant else ""))
        continue
      evaluated = "made" if transfer_dir(cell, protocol, net, variant) in made else "reused"
      rows.append(table_row(cell, protocol, net, answer, set_status, evaluated, costs)
                  | {"variant": variant})
  add_over_random(rows)
  add_robust_scores(rows)
  result = {"command": "python -m experiments.benchmark " + " ".join(
      shlex.quote(a) for a in sys.argv[1:]), "config": dataclasses.asdict(config),
      "machine": machine(), "rows": rows, "pending": pending, "commands_run": run.ran}
  write_outputs(result, config)
  return result


def run_cells(todo: list[Cell], cells: list[Cell], config: Config, run: Runner,
              made: set[str]) -> None:
  """Runs what `todo`'s cells are missing, --workers cells at once (threads, each waiting on its
  cell's commands). Leaving early (an error, Ctrl-C, SIGTERM) ends every command still running.
  A cell that fails does not stop the others: the failures are reported together at the end."""
  if not config.runs_nothing:
    os.makedirs(config.root, exist_ok=True)
    cli.log(f"the benchmark: {len(todo)} of {len(cells)} cells to run, {config.workers} at a "
            "time; after each, the cells done and an estimate of the time left (from the "
            "cells so far: cells differ, so it firms up as they finish)")
  failed = []
  start, finished, lock = time.perf_counter(), [0], threading.Lock()

  def one(cell: Cell) -> None:
    if not config.dry_run:
      cli.log(f"[cell {cells.index(cell)} of 0-{len(cells) - 1}] {cell.label()} "
              f"({cell.workdir})")
    try:
      run_cell(cell, config, run, made)
    except cli.USER_ERRORS as e:
      if not run.stopped:
        cli.log(f"error in {cell.workdir}: {e}")
        failed.append(f"{cell.workdir}: {e}")
    if not config.dry_run and not run.stopped:
      with lock:
        finished[0] += 1
        elapsed = time.perf_counter() - start
        left = elapsed / finished[0] * (len(todo) - finished[0])
        cli.log(f"{finished[0]} of {len(todo)} cells done in {_duration(elapsed)}; about "
                f"{_duration(left)} left")

  if config.workers == 1 or config.dry_run:
    for cell in todo:
      one(cell)
  else:
    with concurrent.futures.ThreadPoolExecutor(config.workers) as pool:
      futures = [pool.submit(one, cell) for cell in todo]
      try:
        for future in futures:
          future.result()
      finally:  # a no-op once every cell is done
        run.stop()
        pool.shutdown(wait=False, cancel_futures=True)
  if failed:
    raise cli.UserError(f"{len(failed)} of {len(todo)} cells failed: " + "; ".join(failed))


def _duration(seconds: float) -> str:
  return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def command_line(config: Config, **changes) -> list[str]:
  """The arguments of this command with `config` (and `changes`), its defaults left out."""
  config = dataclasses.replace(config, **changes)
  argv = []
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    flag = "--" + field.name.replace("_", "-")
    if value != field.default:
      argv.append((flag if value else f"--no-{flag[2:]}") if isinstance(value, bool)
                  else f"{flag}={value}")
  return argv


def write_slurm(config: Config, cells: list[Cell]) -> None:
  """A SLURM job array running one cell per task (see --slurm)."""
  argv = command_line(config, slurm="", workers=1, cell=-1, dry_run=False, table_only=False)
  table = "python -m experiments.benchmark " + shlex.join([*argv, "--table-only"])
  lines = ["#!/bin/bash", "#SBATCH --job-name=benchmark", f"#SBATCH --array=0-{len(cells) - 1}",
           "# One cell of the benchmark per array task (written by experiments.benchmark "
           "--slurm);", "# submit with `sbatch [resources, e.g. --gres=gpu:1 --time=1-0] "
           f"{config.slurm}`; once every task is done:", f"#   {table}", "# The cells:"]
  lines += [f"#   {i}: {c.label()} ({c.workdir})" for i, c in enumerate(cells)]
  lines += [f"cd {shlex.quote(os.getcwd())}",
            f"exec {shlex.quote(sys.executable)} -m experiments.benchmark {shlex.join(argv)} "
            '--cell "$SLURM_ARRAY_TASK_ID"']
  atomic_write(config.slurm, ("\n".join(lines) + "\n").encode())
  cli.log(f"written {config.slurm}: a job array of {len(cells)} cells; submit it with sbatch")


def machine() -> str:
  """What ran the evaluations: CPU cores and model, and JAX's devices."""
  model = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), model)
  return f"{os.cpu_count()} CPU cores ({model}); JAX devices: {cli.describe_devices()}"


def markdown(result: dict) -> str:
  """The table as markdown, with the command and where each number came from."""
  header = ("| method | dataset | ipc | net | protocol | test acc (%) +- 95% interval (nets) | "
            "over random | published (its evaluation) | gap | storage | distillation | "
            "evaluation (all nets) |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
  lines = [header]
  for r in base_rows(result["rows"]):
    pub = "" if r["published"] is None else f"{r['published']:.2f} ({r['published_protocol']})"
    gap = ("" if r["published"] is None else f"{r['gap']:+.2f}" if r.get("comparable")
           else "no comparable figure")
    half = r.get("test_acc_ci95")
    acc = (f"{100 * r['test_acc_mean']:.2f} +- {100 * half:.2f}" if half == half and half
           is not None else f"{100 * r['test_acc_mean']:.2f}")
    over = "" if r.get("over_random") is None else f"{r['over_random']:+.2f}"
    lines.append(f"| {r['method']} | {r['dataset']} | {r['ipc'] or 'all'} | {r['net']} | "
                 f"{r['protocol']} | {acc} ({len(r['seeds'])}) | {over} | {pub} | {gap} | "
                 f"{_bytes(r.get('storage'))} | "
                 f"{_cost(r.get('distil_wall_time'), r.get('distil_cpu_time'))} | "
                 f"{_cost(r['train_time'], r.get('eval_cpu_time'))} |")
  lines.append("")
  lines += fair_table(result["rows"])
  lines += [f"- {line}" for line in lossless(base_rows(result["rows"]))]
  if result.get("pending"):
    lines.append(f"- Not finished yet ({len(result['pending'])}): "
                 + "; ".join(result["pending"]))
  lines.append("")
  lines.append(f"`{result['command']}` on {result['machine']}; each number is the "
               "`transfer.json` in the workdir listed in benchmark.json. The interval is "
               "Student's t over the networks; over random: points above the random real subset "
               "of the same size evaluated the same way; a gap only against a published figure "
               "measured under the same protocol and width (bench/published.json); storage: the "
               "set's images, labels (1 byte per hard label), extras and preprocessing, as "
               "float32 (blank where the set is not kept); distillation: the run's wall time; "
               "evaluation: the networks' training time (updates only); each with the process "
               "CPU seconds, every thread, where the run recorded them.")
  return "\n".join(lines) + "\n"


def fair_table(rows: list[dict]) -> list[str]:
  """The fair scores' table (lines, ending with a blank one), or nothing without --fair rows."""
  scored = [r for r in base_rows(rows) if "lrs" in r or "ars" in r]
  if not scored:
    return []
  lines = ["| method | dataset | ipc | net | protocol | acc, its labels | acc, hard labels | HLR | "
           "IOR | LRS | acc, no augmentation | ARS |", "|---|---|---|---|---|---|---|---|---|---|"
           "---|---|"]
  for r in scored:
    lrs, ars = r.get("lrs", {}), r.get("ars", {})
    cells = [f"{100 * r['test_acc_mean']:.2f}",
             f"{100 * r['hard_acc']:.2f}" if "hard_acc" in r else "",
             f"{100 * lrs['hlr']:+.2f}" if lrs else "", f"{100 * lrs['ior']:+.2f}" if lrs else "",
             f"{lrs['lrs']:.1f}" if lrs else "",
             f"{100 * r['noaug_acc']:.2f}" if "noaug_acc" in r else "",
             f"{ars['ars']:.1f}" if ars else ""]
    lines.append(f"| {r['method']} | {r['dataset']} | {r['ipc']} | {r['net']} | {r['protocol']} | "
                 + " | ".join(cells) + " |")
  lines += ["", "Fair scores (DD-Ranking, `kip.scores`; accuracies in %, HLR and IOR in points): "
            "HLR = full split - set, both with hard labels; IOR = set with its labels - random "
            "real subset of its size (hard labels); LRS and ARS in [0, 100], 26.9 at a = 0.", ""]
  return lines


def _bytes(cost: dict | None) -> str:
  if not cost:
    return ""
  total = cost["total"]
  return f"{total / 2**20:.2f} MB" if total >= 2**20 else f"{total / 2**10:.1f} KB"


def _cost(wall: float | None, cpu: float | None) -> str:
  if wall is None:
    return ""
  return f"{wall:.0f} s" + ("" if cpu is None else f" (CPU {cpu:.0f} s)")


def lossless(rows: list[dict], within: float = 1.0) -> list[str]:
  """Per method, dataset, protocol and network with a full-data row beside it: the smallest set
  within `within` points of the full data's accuracy, and what one network on it costs against
  one on the full data (which trained --full-steps steps). The saving is counted in training
  images processed (steps x batch: the same network and image size, so proportional to compute,
  and independent of what else shared the machine); the measured wall times are given beside."""
  out = []
  for full in (r for r in rows if r["kind"] == "full"):
    group = (full["dataset"], full["protocol"], full["net"])
    target = 100 * full["test_acc_mean"] - within
    setting = (f"{group[0]} ({group[1]}, {group[2]}; the full split trained {full['steps']} "
               "steps)")
    short = []  # the methods none of whose sizes gets there: one line for all of them
    for method in sorted({r["method"] for r in rows if r["kind"] != "full"
                          and (r["dataset"], r["protocol"], r["net"]) == group}):
      sets = sorted((r for r in rows if r["method"] == method and r["kind"] != "full"
                     and (r["dataset"], r["protocol"], r["net"]) == group),
                    key=lambda r: r["ipc"])
      hit = next((r for r in sets if 100 * r["test_acc_mean"] >= target), None)
      if hit is None:
        best = max(sets, key=lambda r: r["test_acc_mean"])
        short.append(f"{method} {100 * best['test_acc_mean']:.2f}% ({best['ipc']} per class)")
      else:
        out.append(f"{method} on {setting}: {hit['ipc']} per class is within {within:g} "
                   f"point of the full data ({100 * hit['test_acc_mean']:.2f}% vs "
                   f"{100 * full['test_acc_mean']:.2f}%); one network trains on "
                   f"{hit['images_per_net']:,} images ({hit['steps']} steps, "
                   f"{hit['train_time_per_net']:.0f} s measured) against "
                   f"{full['images_per_net']:,} ({full['steps']} steps, "
                   f"{full['train_time_per_net']:.0f} s) on the full split: "
                   f"{_saving(hit['images_per_net'], full['images_per_net'])}")
    if short:
      out.append(f"on {setting} no size is within {within:g} point of the full data's "
                 f"{100 * full['test_acc_mean']:.2f}%; the best of each: " + ", ".join(short))
  return out


def _saving(mine: float, theirs: float) -> str:
  if mine <= theirs:
    return f"{100 * (1 - mine / theirs):.0f}% less training"
  return f"{mine / theirs:.1f}x the training (no saving)"


def write_outputs(result: dict, config: Config) -> None:
  out = config.out or config.root
  os.makedirs(out, exist_ok=True)
  write_json(os.path.join(out, "benchmark.json"), result)
  table = markdown(result)
  atomic_write(os.path.join(out, "benchmark.md"), table.encode())
  plot_accuracy(base_rows(result["rows"]), os.path.join(out, "benchmark.png"))
  if config.readme:
    replace_block(config.readme, table)
  print(table)
  cli.log(f"written {out}/benchmark.md, benchmark.json, benchmark.png")


def replace_block(path: str, table: str | None = None) -> None:
  """Replaces the text between BEGIN and END in the markdown file `path` with `table`
  (atomically); without `table`, only checks that there is such a block (one line if not)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError as e:
    raise cli.UserError(f"--readme {path}: {e.strerror}") from None
  if BEGIN not in text or END not in text:
    raise cli.UserError(f"--readme {path} has no `{BEGIN}` ... `{END}` block to replace")
  if table is not None:
    head, rest = text.split(BEGIN, 1)
    atomic_write(path, f"{head}{BEGIN}\n{table}{END}{rest.split(END, 1)[1]}".encode())


def plot_accuracy(rows: list[dict], path: str) -> None:
  """Accuracy (top) and the training cost of one network (bottom: images processed, steps x
  batch, which the measured wall times follow when the machine is not shared) against images per
  class, one line per method (and network), a column per dataset and protocol; the full-data row
  as a horizontal line in both."""
  import matplotlib  # noqa: PLC0415

  from kip.plots import save_figure  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  panels = sorted({(r["dataset"], r["protocol"]) for r in rows})
  n = max(len(panels), 1)
  fig, axes = plt.subplots(2, n, figsize=(5 * n, 7.5), squeeze=False, sharex="col",
                           layout="constrained")
  for col, (dataset, protocol) in enumerate(panels):
    acc_ax, time_ax = axes[0][col], axes[1][col]
    chosen = [r for r in rows if (r["dataset"], r["protocol"]) == (dataset, protocol)]
    for key in sorted({(r["method"], r["net"]) for r in chosen if r["kind"] != "full"}):
      line = sorted((r["ipc"], 100 * r["test_acc_mean"], 100 * r["test_acc_std"],
                     r["images_per_net"])
                    for r in chosen if (r["method"], r["net"]) == key)
      x, y, e, t = (np.asarray(v) for v in zip(*line, strict=True))
      label = f"{key[0]} ({key[1]})"
      acc_ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label)
      time_ax.plot(x, t, marker="o", label=label)
    for r in (r for r in chosen if r["kind"] == "full"):
      label = f"full data ({r['net']}, {r['steps']} steps)"
      acc_ax.axhline(100 * r["test_acc_mean"], color="k", ls="--", lw=1, label=label)
      time_ax.axhline(r["images_per_net"], color="k", ls="--", lw=1, label=label)
    sizes = sorted({r["ipc"] for r in chosen if r["kind"] != "full"})
    for ax in (acc_ax, time_ax):
      ax.set_xscale("log")
      if sizes:
        ax.set_xticks(sizes, [str(v) for v in sizes])
        ax.minorticks_off()
      ax.grid(alpha=0.3)
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_title(f"{dataset}, {protocol} protocol")
    acc_ax.legend(fontsize=7)
    time_ax.set_yscale("log")
    time_ax.set_xlabel("images per class")
    time_ax.set_ylabel("images per network\n(steps x batch)")
  save_figure(fig, path)


def run(config: Config, workdir: str, devices) -> list[str]:
  result = run_benchmark(config)
  if config.dry_run and result.get("commands_run"):
    return ["\n".join(result["commands_run"])]
  return []


JOB = Job("benchmark", Config, run, workdir=False)


def stop_on_sigterm(signum, frame):
  """The command's SIGTERM handler: unwinds, so the commands running are stopped."""
  raise SystemExit(128 + signum)
