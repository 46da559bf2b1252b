"""One benchmark table across methods, datasets, set sizes, protocols and networks:

  python -m experiments.benchmark --methods dm,datadam --dataset mnist --ipc 1,10 --seeds 5

Every cell is a command of this project run in its own workdir under --root, so an interrupted
benchmark resumes cell by cell and a finished cell is read back, not redone (only for the
settings it was made with: a workdir holding a run with others is refused, naming them):
  distillation  <root>/<method>-<dataset>-ipc<ipc>                (experiments.<method>)
  coresets      <root>/coreset-<select>-<dataset>-ipc<ipc>        (experiments.coreset)
  expert store  the trajectory methods' default (experiments.buffer; PAD's with its curriculum)
  evaluation    <cell>/transfer-<protocol>[-<net>]               (experiments.transfer)
  full data     <root>/full-<dataset>[-steps<N>]/transfer-<protocol>[-<net>]  (N: --full-steps)
The same layout as `bench.methods`, so sets distilled there are reused here. Imported sets
(`--sets`, any format `kip.io` reads: RFAD, FRePo, DC/DSA/DM, MTT/DATM/PAD, DC-Bench, KIP/LS) are
evaluated in <root>/imported-<name>/. Rows: each method, each imported set, the coresets (random,
herding, k-center) and the full training split; columns: accuracy (mean +- std over --seeds
networks), the published figure where ANCHORS.md has one for the same dataset and size (ConvNet
rows; with the protocol it was measured under; for an imported DC file, the accuracy it records),
the gap, and the training time of the evaluation.

Writes <out>/benchmark.md (the table), benchmark.json (every number with the workdir it came
from) and benchmark.png (accuracy, and the images one network trains on, against images per
class, one line per method and network); with a full-data row, the smallest set within a point of
it and its training saving, counted in images processed (steps x batch) beside the wall times;
--readme FILE replaces the table between `<!-- benchmark:begin -->` and `<!-- benchmark:end -->`.
--table-only writes them from the cells finished so far and lists the rest, running nothing (the
progress of a benchmark that spans days, e.g. while it runs in another process).

Several processes can share the work: give the same command in each (one per GPU, or two on
this project's 2-core CPU). A cell is locked while one process works on it (`<root>/.locks/`,
an expert store in `.locks/` beside it); the others pass to the next free cell, and once through
their list wait for the cells still held elsewhere and read them back, so every process ends
with the whole table (a cell whose process died is taken over). The lock is `flock`: processes
on one machine, or hosts sharing a filesystem whose locks work across them.

Presets: cpu (default) runs every method at its own CPU preset and evaluates at the protocol's
published schedule (dc: 1000 epochs on MNIST-sized sets with DC's augmentation), the full split
capped at --full-steps; on this project's 2-core CPU one method at 1 and 10 images per class on
one dataset takes one to two hours (distillation 3-50 min per set; a 5-seed dc evaluation at
10 per class about 12 min with ConvNet-3 of width 32, --transfer-args "--width 32", 50 min at
the protocol's 128; of an MLP about a minute). paper runs every method and evaluation at
`--preset paper` (GPU-sized).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence

import numpy as np

from kip import cli
from kip.io import atomic_write, file_lock, write_json
from kip.loop import latest_checkpoint
from kip.nets import NETS
from kip.train import PROTOCOLS
from methods.coreset import SELECTIONS

f = cli.field
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Methods with a command `experiments.<name>` that writes <workdir>/distilled.npz with labels.
METHODS = ("kip", "label_solve", "frepo", "rfad", "dm", "datadam", "mtt", "datm", "pad")
_PRESETS = ("frepo", "rfad", "dm", "datadam", "mtt", "datm", "pad")  # take --preset
_TRAJECTORY = {"mtt": {}, "datm": {}, "pad": {"curriculum": "pad"}}  # their stores' flags

FULL_STEPS = 2000  # the full-data row's default budget (8.5 epochs of MNIST at batch 256)

# Published accuracy of networks trained on the distilled sets, ipc -> %, from ANCHORS.md
# (verified in the papers or their code); the protocol each was measured under.
PUBLISHED = {
    ("kip", "mnist"): ({1: 90.1, 10: 97.5, 50: 98.3}, "KIP finite ConvNet (width 1024, MSE)"),
    ("kip", "fashion_mnist"): ({1: 73.5, 10: 86.8, 50: 88.0}, "KIP finite ConvNet"),
    ("label_solve", "mnist"): ({1: 73.35, 10: 96.39, 50: 98.28},
                               "ConvNet-kernel regression on the released LS sets"),
    ("label_solve", "fashion_mnist"): ({1: 65.30, 10: 80.84, 50: 86.85},
                                       "ConvNet-kernel regression on the released LS sets"),
    ("frepo", "mnist"): ({1: 93.0, 10: 98.6, 50: 99.2}, "FRePo's"),
    ("frepo", "fashion_mnist"): ({1: 75.6, 10: 86.2, 50: 89.6}, "FRePo's"),
    ("rfad", "mnist"): ({1: 94.4, 10: 98.5, 50: 98.8}, "RFAD finite (width 1024)"),
    ("rfad", "fashion_mnist"): ({1: 78.6, 10: 87.0, 50: 88.8}, "RFAD finite"),
    ("dm", "mnist"): ({1: 89.7, 10: 97.5, 50: 98.6}, "DSA/DM ConvNet-3"),
    ("dm", "fashion_mnist"): ({1: 70.6, 10: 83.5, 50: 88.1}, "DSA/DM ConvNet-3"),
    ("datadam", "mnist"): ({10: 88.36}, "the MNIST report (50 epochs, cosine)"),
    ("pad", "mnist"): ({1: 49.97, 10: 90.55, 100: 97.04}, "the MNIST report (50 epochs, cosine)"),
    ("full", "mnist"): ({0: 99.6}, "DC/DM ConvNet-3"),
    ("full", "fashion_mnist"): ({0: 93.5}, "DC/DM ConvNet-3"),
}


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
  protocol: str = f("dc", "comma-separated evaluation protocols: " + ", ".join(PROTOCOLS))
  nets: str = f("auto", "comma-separated evaluation networks (auto: the protocol's; e.g. "
                        "auto,mlp,resnet18 for cross-architecture columns): "
                        + ", ".join(NETS))
  seeds: int = f(5, "networks per cell (mean +- std reported)", minimum=1)
  preset: str = f("cpu", "cpu (each method's CPU preset, published evaluation schedules) or "
                         "paper (every command at --preset paper)", choices=("cpu", "paper"))
  root: str = f("runs/benchmark", "workdirs of every cell")
  out: str = f("", "where the table, JSON and figure go (default: --root)")
  archive: str = f("", "a folder (e.g. <out>/cells, committed) that keeps each finished cell's "
                       "distilled set and reports (distilled.npz, config.json, metrics.jsonl, "
                       "transfer.json; a coreset's images are remade in seconds) and the "
                       "trajectory methods' expert stores, and restores from it what is missing "
                       "under --root and runs/buffers, so the table's command reads back (or "
                       "goes on) on a fresh checkout; of a command still running (every minute) "
                       "or stopped short, also its latest checkpoint, so a fresh checkout "
                       "resumes it there")
  readme: str = f("", "also replace the table between `<!-- benchmark:begin -->` and "
                      "`<!-- benchmark:end -->` in this file")
  method_args: str = f("", "extra flags per method, `method=--flag value;method2=...`")
  transfer_args: str = f("", "extra flags for every evaluation (experiments.transfer)")
  dry_run: bool = f(False, "list the commands that would run, run none")
  table_only: bool = f(False, "run nothing: write the table, JSON, figure (and --readme) from "
                              "the cells finished so far, read back from --root or --archive, "
                              "and list the cells still to run (a long benchmark's progress)")
  in_process: bool = f(False, "run the commands in this process instead of one process each "
                              "(faster to start, as the tests do; a long benchmark is safer in "
                              "separate processes)")
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


def _split(text: str) -> list[str]:
  return [t for t in (s.strip() for s in text.split(",")) if t]


def check(config: Config) -> None:
  """Every list flag checked against what exists, before any work."""
  from kip.data import DATASETS  # noqa: PLC0415

  for name in _split(config.methods):
    cli.check_choice("method", name, METHODS)
  for name in _split(config.dataset):
    cli.check_choice("dataset", name, tuple(DATASETS))
  for name in _split(config.coresets):
    cli.check_choice("coreset", name, SELECTIONS)
  for name in _split(config.protocol):
    cli.check_choice("protocol", name, tuple(PROTOCOLS))
  for name in _split(config.nets):
    cli.check_choice("net", name, ("auto", *NETS))
  for value in _split(config.ipc):
    if not value.isdigit() or int(value) < 1:
      raise cli.UserError(f"--ipc takes positive integers, got {value!r}")
  for item in _split(config.sets):
    path = item.partition("=")[2] or item
    if not os.path.exists(path):
      raise cli.UserError(f"--sets: {path}: no such file")
  if not (_split(config.methods) or _split(config.sets) or _split(config.coresets)
          or config.full):
    raise cli.UserError("nothing to benchmark: give --methods, --sets, --coresets or --full")


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
      support = next((c.support for c in cells if c.dataset == dataset), "")
      budget = "" if config.full_steps == FULL_STEPS else f"-steps{config.full_steps}"
      cells.append(Cell("full", "full", dataset, 0,
                        os.path.join(config.root, f"full-{dataset}{budget}"), support))
  return cells


class Runner:
  """Runs this project's commands as subprocesses (`runs_nothing`: only lists them)."""

  def __init__(self, config: Config):
    self.config = config
    self.ran: list[str] = []
    self.data = []
    if config.manual_dir:
      self.data += ["--manual-dir", config.manual_dir]
    if config.data_dir:
      self.data += ["--data-dir", config.data_dir]

  def __call__(self, module: str, *args: str, watch: str = "") -> None:
    """Runs `python -m module args`; `watch`: the run's workdir, whose progress (its latest
    checkpoint) goes into --archive every PROGRESS_EVERY seconds and when the command stops short
    (a finished one is archived by the caller)."""
    argv = [module, *args, *self.data] + ([] if self.config.progress else ["--no-progress"])
    line = "python -m " + " ".join(shlex.quote(a) for a in argv)
    self.ran.append(line)
    cli.log(f"$ {line}")
    if self.config.runs_nothing:
      return
    finished = False
    try:
      if self.config.in_process:
        importlib.import_module(module).main(argv[1:])
        code = 0
      else:
        code = self._watched([sys.executable, "-m", *argv], watch)
      finished = code == 0
    finally:
      if not finished:  # stopped short: its progress is kept for a fresh checkout
        archive_progress(watch, self.config)
    if code:
      raise cli.UserError(f"failed (exit {code}): {line}")

  def _watched(self, command: list[str], watch: str) -> int:
    """Runs `command` to its end (its exit code), keeping `watch`'s progress in the archive every
    PROGRESS_EVERY seconds. Stopped (Ctrl-C, SIGTERM), it stops the command too, at its last
    atomic checkpoint, instead of leaving it running unwatched beside a rerun."""
    with subprocess.Popen(command, cwd=os.getcwd()) as child:
      try:
        while True:
          try:
            return child.wait(timeout=PROGRESS_EVERY)
          except subprocess.TimeoutExpired:
            self._keep_progress(watch)
      except BaseException:
        child.terminate()
        child.wait()
        raise

  def _keep_progress(self, watch: str) -> None:
    try:
      archive_progress(watch, self.config)
    except OSError as error:  # the command goes on; the archive catches up later
      cli.log(f"could not keep {watch}'s progress in the archive: {error}")


def _method_args(config: Config) -> dict[str, list[str]]:
  out = {}
  for item in (s for s in config.method_args.split(";") if s.strip()):
    name, _, flags = item.partition("=")
    out[name.strip()] = shlex.split(flags)
  return out


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def last_metrics(workdir: str) -> dict:
  """The latest value of every metric in `workdir`/metrics.jsonl ({} without one)."""
  latest = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          latest.update(json.loads(line))
  return latest


def distillation_finished(workdir: str, steps: int | None = None) -> bool:
  """Whether `workdir` holds a finished run: its set, and its last step at `steps` (default: its
  configured steps; a run without steps is finished once its set exists)."""
  if not os.path.exists(os.path.join(workdir, "distilled.npz")):
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


def check_settings(workdir: str, module: str, args: Sequence[str],
                   ignore: Sequence[str] = (), inputs: dict[str, str] | None = None):
  """The config `python -m module args` runs with; refuses (one line) when `workdir` holds a run
  recorded with other settings, so that a finished cell is never read back for a request it
  does not answer (e.g. a set distilled with another kernel, or evaluated with another width).
  A flag added after the run was recorded counts as having had its default then. `inputs`
  (name -> path, as the command records them): refused too when the run was made from another
  content of one of them (e.g. an evaluation of a set that has since been distilled further)."""
  command = importlib.import_module(module)
  try:
    wanted = cli.parse_config(command.Config, list(args), "",
                              presets=getattr(command, "PRESETS", None))
  except SystemExit as e:  # argparse has printed why
    raise cli.UserError(f"bad flags for {module}: {' '.join(args)}") from e
  recorded = _read_json(os.path.join(workdir, "config.json"))
  if recorded is not None:
    changed = cli.changed_inputs(recorded, inputs or {})
    if changed:
      raise cli.UserError(f"{workdir} holds a {module.rsplit('.', 1)[-1]} run made from another "
                          f"{', '.join(changed)} (its content changed since); remove it to redo "
                          "it")
    defaults = {f.name: f.default for f in dataclasses.fields(wanted)}
    current = dataclasses.asdict(wanted)
    differ = cli.changed_settings(recorded, current, wanted, _NOT_SETTINGS | set(ignore)
                                  | set(cli.content_compared(recorded, inputs or {})))
    if differ:
      changes = ", ".join(f"{k}: {recorded.get(k, defaults[k])!r} -> {current[k]!r}"
                          for k in differ)
      raise cli.UserError(f"{workdir} holds a {module.rsplit('.', 1)[-1]} run with other "
                          f"settings ({changes}); use another --root, or remove it to redo it")
  return wanted


@contextlib.contextmanager
def claimed(folder: str, config: Config, wait: bool):
  """Holds `folder`'s lock (in `.locks/` beside it) for this process: yields True once held, or
  False at once when another process holds it and `wait` is False. Nothing is locked when
  nothing runs (`runs_nothing`)."""
  if config.runs_nothing:
    yield True
    return
  path = os.path.join(os.path.dirname(os.path.abspath(folder)), ".locks",
                      os.path.basename(os.path.normpath(folder)) + ".lock")
  with file_lock(path, wait=wait) as held:
    yield held


def make_set(cell: Cell, config: Config, run: Runner, extra: dict, wait: bool = True) -> str:
  """The cell's distilled.npz, made unless a finished run with the same settings is in its
  workdir; returns how it was obtained ("reused" or "made"), or "busy" when its expert store is
  being made by another process and `wait` is False."""
  if cell.kind in ("set", "full"):
    return "reused"
  if cell.kind == "coreset":
    module = "experiments.coreset"
    args = ["--dataset", cell.dataset, "--ipc", str(cell.ipc), "--select", cell.name,
            "--workdir", cell.workdir]
  else:
    module = f"experiments.{cell.name}"
    args = ["--dataset", cell.dataset, "--ipc", str(cell.ipc), "--workdir", cell.workdir,
            *(["--preset", config.preset] if cell.name in _PRESETS else []),
            *extra.get(cell.name, [])]
  # `steps` may grow: a finished run is then extended by its own command.
  wanted = check_settings(cell.workdir, module, args, ignore=("steps",))
  if distillation_finished(cell.workdir, getattr(wanted, "steps", None)):
    return "reused"
  if config.table_only:
    return "pending"
  if cell.name in _TRAJECTORY and cell.kind == "method":
    from experiments.buffer import default_buffer  # noqa: PLC0415

    flags = _TRAJECTORY[cell.name]
    store = default_buffer(cell.dataset, config.preset, **flags)
    with claimed(store, config, wait) as mine:
      if not mine:
        return "busy"
      restore(store, config)
      run("experiments.buffer", "--dataset", cell.dataset, "--preset", config.preset,
          *(a for k, v in flags.items() for a in (f"--{k}", v)), watch=store)
      archive(store, config)
  # Only distilled sets are kept: a coreset is remade in seconds.
  run(module, *args, watch=cell.workdir if cell.kind == "method" else "")
  return "made"


# The files the archive keeps: what a cell's read-back needs (the set and how it was made, for
# distillation_finished; the distillation's wall time; the evaluation's report) and an expert
# store's finished experts (and a PAD store's difficulty scores, which order its next expert).
# Of a run still going (or cut off), its progress too: the latest checkpoint of each run folder
# in it with that folder's metrics.jsonl, so a fresh checkout resumes the run instead of
# starting it again; a finished folder's progress is dropped.
_KEPT = re.compile(r"distilled\.npz|config\.json|metrics\.jsonl|transfer\.json|store\.json"
                   r"|expert_\d+\.(npy|json)|difficulty\.npy")
PROGRESS_EVERY = 60.0  # seconds between copies of a running command's progress into --archive


def archived(folder: str, config: Config) -> str:
  """Where the archive keeps `folder` (a workdir under --root, or an expert store)."""
  if os.path.basename(os.path.dirname(os.path.abspath(folder))) == "buffers":
    return os.path.join(config.archive, "buffers", os.path.basename(folder))
  return os.path.join(config.archive, os.path.relpath(folder, config.root))


def restore(folder: str, config: Config) -> None:
  """Copies `folder`'s archived files (and the progress of a run cut off) back when the folder
  does not exist (a fresh checkout); a folder that exists, finished or interrupted, is left to
  its own run."""
  source = archived(folder, config) if config.archive else ""
  if not source or os.path.exists(folder) or not os.path.isdir(source):
    return
  for here in _own_folders(source):  # what the archive holds was kept on purpose: all of it
    for name in sorted(os.listdir(here)):
      if os.path.isfile(os.path.join(here, name)):
        _copy_file(os.path.join(here, name), os.path.join(folder, os.path.relpath(here, source),
                                                          name))
  cli.log(f"restored {folder} from {source}")


def archive(folder: str, config: Config) -> None:
  """Copies `folder`'s finished files into the archive and drops the progress kept for it."""
  if config.archive and not config.runs_nothing and os.path.isdir(folder):
    target = archived(folder, config)
    _copy_kept(folder, target)
    for name in sorted(os.listdir(target)):
      if os.path.isdir(os.path.join(target, name)) and not name.startswith("transfer-"):
        shutil.rmtree(os.path.join(target, name))


def archive_progress(folder: str, config: Config) -> None:
  """Keeps the progress of the run(s) in `folder`: for every folder under it with checkpoints,
  its latest checkpoint (older ones kept before are removed) and then its metrics.jsonl, so the
  kept metrics reach at least the kept checkpoint (a resumed run drops records past it); and the
  kept files of `folder` itself."""
  if not folder or not config.archive or config.runs_nothing or not os.path.isdir(folder):
    return
  target = archived(folder, config)
  for here in _own_folders(folder):
    latest = latest_checkpoint(here)
    if latest is None:
      continue
    kept = os.path.join(target, os.path.relpath(here, folder))
    name = os.path.basename(latest[1])
    _copy_file(latest[1], os.path.join(kept, "checkpoints", name))
    for old in os.listdir(os.path.join(kept, "checkpoints")):
      if old != name:
        os.remove(os.path.join(kept, "checkpoints", old))
    _copy_kept(here, kept)
  _copy_kept(folder, target)


def _own_folders(folder: str):
  """`folder` and the folders under it, but not its evaluations (`transfer-*`: kept on their
  own)."""
  for here, dirs, _ in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("transfer-"))
    yield here


def _copy_kept(source: str, target: str) -> None:
  """Copies the files of `source` that _KEPT names into `target`, rewriting only those whose
  bytes differ (a committed archive is not touched when nothing changed)."""
  for name in sorted(os.listdir(source)):
    path = os.path.join(source, name)
    if _KEPT.fullmatch(name) and os.path.isfile(path):
      _copy_file(path, os.path.join(target, name))


def _copy_file(path: str, kept: str) -> None:
  with open(path, "rb") as f:
    content = f.read()
  if os.path.isfile(kept):
    with open(kept, "rb") as f:
      if f.read() == content:
        return
  atomic_write(kept, content)


def transfer_dir(cell: Cell, protocol: str, net: str) -> str:
  return os.path.join(cell.workdir, f"transfer-{protocol}" + ("" if net == "auto" else f"-{net}"))


def evaluate(cell: Cell, protocol: str, net: str, config: Config, run: Runner) -> tuple:
  """(the row of transfer.json, "reused" | "made"): a finished evaluation with the same settings
  and at least --seeds networks is read back; otherwise experiments.transfer runs (and
  resumes)."""
  tdir = transfer_dir(cell, protocol, net)
  restore(tdir, config)
  row_name = "full" if cell.kind == "full" else "distilled"
  seeds = config.full_seeds if cell.kind == "full" else config.seeds
  rows = (["--no-distilled", "--baselines", "full", "--full-steps", str(config.full_steps)]
          if cell.kind == "full" else ["--baselines", "none"])
  args = ["--support", cell.support, "--dataset", cell.dataset, "--protocol", protocol,
          "--net", net, "--seeds", str(seeds), "--preset", config.preset, "--workdir", tdir,
          *rows, *shlex.split(config.transfer_args)]
  # The full row's --support only sizes its network (any set of the dataset will do).
  # A dry run makes no set, nor does --table-only (a coreset is not kept in the archive: its
  # evaluation is read back without it): one that does not exist has no content to compare.
  full = cell.kind == "full"
  unmade = config.runs_nothing and not os.path.exists(cell.support)
  check_settings(tdir, "experiments.transfer", args, ignore=("support",) if full else (),
                 inputs=None if full or unmade else {"support": cell.support})
  row = _row(_read_json(os.path.join(tdir, "transfer.json")), row_name, seeds)
  if row is not None:
    return row, "reused"
  if config.table_only:
    return None, "pending"
  run("experiments.transfer", *args, watch=tdir)
  if config.dry_run:
    return None, "dry run"
  return _row(_read_json(os.path.join(tdir, "transfer.json")), row_name, seeds), "made"


def _row(report: dict | None, name: str, seeds: int) -> dict | None:
  for row in (report or {}).get("rows", []):
    if row["row"] == name and len(row["seeds"]) >= seeds:
      return row
  return None


def published(cell: Cell, net: str) -> tuple[float | None, str]:
  """The published figure for the cell's method, dataset and size, and the protocol it was
  measured under; none for another architecture (every published figure is a ConvNet's)."""
  if net.startswith(("mlp", "resnet")):
    return None, ""
  if cell.recorded is not None:
    return cell.recorded, "the authors', recorded in the file (ConvNet)"
  key = ("full" if cell.kind == "full" else cell.name, cell.dataset)
  table, protocol = PUBLISHED.get(key, ({}, ""))
  value = table.get(cell.ipc)
  return value, protocol if value is not None else ""


def table_row(cell: Cell, protocol: str, net: str, row: dict, made: str, evaluated: str
              ) -> dict:
  """The table's row of one evaluation (`row`: its transfer.json row)."""
  pub, pub_protocol = published(cell, row["net"])
  acc = 100 * row["test_acc_mean"]
  return {
      "kind": cell.kind, "method": cell.name, "dataset": cell.dataset, "ipc": cell.ipc,
      "protocol": protocol, "net": f"{row['net']}-{row['width']}", "seeds": row["seeds"],
      "test_acc": row["test_acc"], "test_acc_mean": row["test_acc_mean"],
      "test_acc_std": row["test_acc_std"], "train_time": row["train_time"],
      "train_time_per_net": row["train_time"] / max(len(row["seeds"]), 1),
      "steps": row["steps"], "images_per_net": row["steps"] * min(
          PROTOCOLS[protocol].batch_size, row["n_images"]),
      "published": pub, "published_protocol": pub_protocol,
      "gap": None if pub is None else acc - pub,
      "distil_wall_time": last_metrics(cell.workdir).get("wall_time")
      if cell.kind == "method" else None,
      "set": cell.support, "workdir": transfer_dir(cell, protocol, net),
      "set_status": made, "evaluation_status": evaluated}


def run_benchmark(config: Config) -> dict:
  check(config)
  os.makedirs(config.root, exist_ok=True)
  run = Runner(config)
  extra = _method_args(config)
  cells = plan(config)
  evaluations = list(enumerate(((c, p, n) for c in cells for p in _split(config.protocol)
                                for n in _split(config.nets)), 1))
  found, pending = {}, {}  # by evaluation number: a table row; a cell not finished yet
  prepared = {}

  def run_cell(cell: Cell, wait: bool) -> bool:
    """Makes (or reads back) `cell`'s set and evaluations; False, doing nothing, when another
    process holds the cell (or its expert store) and `wait` is False."""
    with claimed(cell.workdir, config, wait) as mine:
      if not mine:
        cli.log(f"{cell.workdir}: another benchmark process is on it; on to the next cell")
        return False
      for i, (c, protocol, net) in evaluations:
        if c is not cell:
          continue
        name = (f"{cell.name} {cell.dataset} " + (f"ipc {cell.ipc} " if cell.ipc else "")
                + f"{protocol} {net}")
        cli.log(f"[{i}/{len(evaluations)}] {name}")
        if cell.kind == "full" and not cell.support:
          raise cli.UserError(f"the full-data row of {cell.dataset} needs a set of that "
                              "dataset to size its evaluation: add a method, coreset or --sets")
        if cell.workdir not in prepared:
          # Only distilled sets are kept: a coreset is remade in seconds, the rest have no files.
          if cell.kind == "method":
            restore(cell.workdir, config)
          made = make_set(cell, config, run, extra, wait)
          if made == "busy":
            cli.log(f"{cell.workdir}: its expert store is being made by another benchmark "
                    "process; on to the next cell")
            return False
          prepared[cell.workdir] = made
          if cell.kind == "method":
            archive(cell.workdir, config)
        made = prepared[cell.workdir]
        if made == "pending" and cell.kind == "method":  # --table-only: its set is not finished
          pending[i] = name
          continue
        row, evaluated = evaluate(cell, protocol, net, config, run)
        if row is None:
          if evaluated == "pending":
            pending[i] = name
          continue
        archive(transfer_dir(cell, protocol, net), config)
        found[i] = table_row(cell, protocol, net, row, made, evaluated)
    return True

  elsewhere = [cell for cell in cells if not run_cell(cell, wait=False)]
  for cell in elsewhere:  # held by another process: wait for it, then read back (or take over)
    cli.log(f"waiting for the other benchmark process to finish {cell.workdir}")
    run_cell(cell, wait=True)
  rows = [found[i] for i in sorted(found)]
  result = {"command": "python -m experiments.benchmark " + " ".join(
      shlex.quote(a) for a in sys.argv[1:]), "config": dataclasses.asdict(config),
      "machine": machine(), "rows": rows, "pending": [pending[i] for i in sorted(pending)],
      "commands_run": run.ran}
  if not config.dry_run:
    write_outputs(result, config)
  return result


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
  header = ("| method | dataset | ipc | net | protocol | test acc (%) | published | gap | "
            "train time (all nets) |\n|---|---|---|---|---|---|---|---|---|")
  lines = [header]
  for r in result["rows"]:
    pub = "" if r["published"] is None else f"{r['published']:.2f} ({r['published_protocol']})"
    gap = "" if r["gap"] is None else f"{r['gap']:+.2f}"
    lines.append(f"| {r['method']} | {r['dataset']} | {r['ipc'] or 'all'} | {r['net']} | "
                 f"{r['protocol']} | {cli.percent(r['test_acc_mean'], r['test_acc_std'])} "
                 f"({len(r['seeds'])}) | {pub} | {gap} | {r['train_time']:.0f} s |")
  lines.append("")
  lines += [f"- {line}" for line in lossless(result["rows"])]
  if result.get("pending"):
    lines.append(f"- Not finished yet ({len(result['pending'])}): "
                 + "; ".join(result["pending"]))
  lines.append("")
  lines.append(f"`{result['command']}` on {result['machine']}; each number is the "
               "`transfer.json` in the workdir listed in benchmark.json.")
  return "\n".join(lines) + "\n"


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
  plot_accuracy(result["rows"], os.path.join(out, "benchmark.png"))
  if config.readme:
    replace_block(config.readme, table)
  print(table)
  cli.log(f"written {out}/benchmark.md, benchmark.json, benchmark.png")


BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"


def replace_block(path: str, table: str) -> None:
  """Replaces the text between BEGIN and END in `path` with `table` (atomically)."""
  with open(path) as f:
    text = f.read()
  if BEGIN not in text or END not in text:
    raise cli.UserError(f"--readme {path} has no `{BEGIN}` ... `{END}` block to replace")
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  atomic_write(path, f"{head}{BEGIN}\n{table}{END}{tail}".encode())


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


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__)
  result = run_benchmark(config)
  if config.dry_run:
    print("\n".join(result["commands_run"]))
  return 0


def _terminated(signum, frame):
  raise SystemExit(128 + signum)  # unwinds: the running command is stopped, its progress kept


if __name__ == "__main__":
  signal.signal(signal.SIGTERM, _terminated)
  cli.run_main(main)
