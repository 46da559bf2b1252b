"""Shared fixtures: MNIST through tfds and a prepared-tfds cache.

MNIST is built from the raw files in ../shared/data when that folder has them, else from
$KIP_MANUAL_DIR, else downloaded by tfds; a machine with none of these fails the tests that need it
with one line saying what to do.
"""

import atexit
import os
import pathlib
import shutil
import sys
import tempfile
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# Prepared tfds datasets persist here between test runs (gitignored); the first run builds them.
DATA_DIR = pathlib.Path(os.environ.get("KIP_DATA_DIR", ROOT / ".cache" / "tfds"))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA:CPU with less of LLVM's machine-code optimisation (level 1 of 0-3): the suite mostly
# compiles small programs and runs them briefly, and LLVM's passes were a large part of the
# compile time (test_train, _methods, _trajectory and _krr_st on both cores: 7m04s of CPU at
# XLA's default, 5m35s at level 1, 5m23s at level 0). XLA's own passes (fusion, layouts, buffer
# assignment) are unchanged. Level 1 keeps the default's rounding where checked (a float64 KIP
# loss bit for bit; level 0 moved it by 1e-10, which test_kip's ill-conditioned solve sees). The
# xdist workers and the commands the tests start inherit it; users' runs and bench/ keep XLA's
# default. To test at another level, put --xla_backend_optimization_level in XLA_FLAGS yourself.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
# One on-disk cache of compiled XLA programs for the whole run: pytest's process, which imports
# this first, makes it; the xdist workers and every command the tests start inherit it, so a
# program compiled once (the same network in a resumed run, a rerun command, another test) is read
# back instead of compiled again. Removed when the run ends; compiles under a second stay uncached.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kip-tests-xla-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# No jitted function may capture more than 10 MB of arrays as constants of its program (closed
# over instead of passed: copied into every compile, constant-folded by XLA, held twice). JAX
# warns above JAX_CAPTURED_CONSTANTS_WARN_BYTES; the suite, and every command it starts, turns
# that warning into an error (pyproject's filterwarnings; PYTHONWARNINGS for the commands).
CONSTANTS_LIMIT_BYTES = 10 * 2**20
os.environ.setdefault("JAX_CAPTURED_CONSTANTS_WARN_BYTES", str(CONSTANTS_LIMIT_BYTES))
os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [
    os.environ.get("PYTHONWARNINGS", ""), "error:A large amount of constants:UserWarning"]))


REAL_DATA_FIXTURES = {"mnist", "manual_dir", "data_dir"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
  """A test on real data (it may have to build the tfds dataset first, tens of seconds on a clean
  checkout) is `slow`: `make test-fast` is units and references only. The `slow` tests run first:
  with `make test`'s work stealing, the worker that ends up with the short ones takes the other's
  queued tests when it runs out, so the run ends on short tests instead of one worker on a long one
  while the other idles."""
  for item in items:
    if REAL_DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order kept


def find_manual_dir() -> str:
  """../shared/data when it holds MNIST's raw files, else $KIP_MANUAL_DIR, else "" (no manual dir:
  tfds downloads; `load_dataset` and every command's `--manual-dir ''` read it so)."""
  if (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").exists():
    return str(SHARED_DATA)
  return os.environ.get("KIP_MANUAL_DIR", "")


@pytest.fixture(scope="session")
def data_dir() -> str:
  DATA_DIR.mkdir(parents=True, exist_ok=True)
  return str(DATA_DIR)


@pytest.fixture(scope="session")
def manual_dir(data_dir) -> str:
  """The manual dir to pass on (maybe ""), once MNIST is prepared in `data_dir`."""
  folder = find_manual_dir()
  # A prepared dataset has <version>/dataset_info.json (tfds builds in "incomplete.*" folders);
  # checking for it spares the commands-only test files TensorFlow's import.
  if not any(pathlib.Path(data_dir, "mnist").glob("[0-9]*/dataset_info.json")):
    from kip.data import DataError, prepare_dataset

    problem = None
    try:
      prepare_dataset("mnist", data_dir=data_dir, manual_dir=folder or None)
    except DataError as e:
      problem = str(e)
    if problem:  # failed outside the `except`, so pytest shows one line, not the chain
      pytest.fail(f"the tests need MNIST: {problem} (for the tests: put them in "
                  f"{SHARED_DATA}/mnist/ or set KIP_MANUAL_DIR=DIR)", pytrace=False)
  return folder


@pytest.fixture(scope="session")
def mnist(manual_dir, data_dir):
  from kip.data import load_dataset

  return load_dataset("mnist", data_dir=data_dir, manual_dir=manual_dir)


def xla_flags_with_devices(devices: int) -> str:
  """XLA_FLAGS for a command with `devices` simulated CPU devices: the suite's flags (above) and
  the device count, which wins over any earlier one."""
  flags = os.environ.get("XLA_FLAGS", "")
  return f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def run_cli(module: str, *args: str, timeout: float = 600, env: dict | None = None):
  """Runs `python -m module args` from the repo root (with `env` added to the environment);
  returns the CompletedProcess."""
  import subprocess

  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


class InProcessResult(NamedTuple):
  returncode: int
  stdout: str
  stderr: str


@pytest.fixture
def run_in_process(capsys, monkeypatch):
  """`run_cli` for commands that fail before any work (bad flags, bad paths): `python -m module
  args` run in this process through the command's own `cli.run_main`, which spares the start-up
  of a new interpreter (seconds per call). Returns (returncode, stdout, stderr)."""
  import importlib

  from kip import cli

  def run(module: str, *args: str) -> InProcessResult:
    main = importlib.import_module(module).main
    monkeypatch.setattr(sys, "argv", [module, *args])
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
      cli.run_main(main)
    out = capsys.readouterr()
    code = exit_.value.code
    return InProcessResult(code if isinstance(code, int) else 1, out.out, out.err)

  return run


class Interrupt(Exception):
  """What `interrupting`'s update raises: a run killed after some steps."""


def interrupting(method, after: int):
  """`method` whose update raises Interrupt from its (after + 1)-th call on."""
  calls = {"n": 0}

  def update(*args):
    calls["n"] += 1
    if calls["n"] > after:
      raise Interrupt
    return method.update(*args)

  return method._replace(update=update)


def assert_resumed_equals_straight(go, method, after: int):
  """Runs `go("straight", method)`; then `go("resumed", ...)` interrupted after `after` updates
  and run again; asserts the two final states equal leaf by leaf (PRNG keys by their data).
  Returns (straight, resumed), the loop's results."""
  import chex
  import jax

  straight = go("straight", method)
  with pytest.raises(Interrupt):
    go("resumed", interrupting(method, after))
  resumed = go("resumed", method)

  def data(state):  # PRNG keys compared by their data
    return jax.tree_util.tree_map(
        lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
        else a, state)

  chex.assert_trees_all_equal(data(straight.state), data(resumed.state))
  return straight, resumed


def make_mhist_folder(root, rows, size=(224, 224)):
  """A folder in MHIST's published layout: annotations.csv + images/<name>.png, random pixels."""
  rng = np.random.default_rng(0)
  folder = root / "mhist"
  (folder / "images").mkdir(parents=True)
  lines = ["Image Name,Majority Vote Label,Number of Annotators who Selected SSA (Out of 7),"
           "Partition"]
  pixels = {}
  for i, (label, partition) in enumerate(rows):
    name = f"MHIST_{i:03d}.png"
    pixels[name] = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels[name]).save(folder / "images" / name)
    lines.append(f"{name},{label},{3 if label == 'SSA' else 1},{partition}")
  (folder / "annotations.csv").write_text("\n".join(lines) + "\n")
  return folder, pixels

