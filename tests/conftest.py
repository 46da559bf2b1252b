"""Shared fixtures: the real MNIST raw files in ../shared/data and a prepared-tfds cache."""

import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("KIP_MANUAL_DIR", ROOT.parent / "shared" / "data"))
# Prepared tfds datasets persist here between test runs (gitignored); the first run builds them.
DATA_DIR = pathlib.Path(os.environ.get("KIP_DATA_DIR", ROOT / ".cache" / "tfds"))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def manual_dir() -> str:
  if not (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").exists():
    pytest.fail(f"real MNIST raw files not found in {SHARED_DATA}/mnist (set KIP_MANUAL_DIR)")
  return str(SHARED_DATA)


@pytest.fixture(scope="session")
def data_dir() -> str:
  DATA_DIR.mkdir(parents=True, exist_ok=True)
  return str(DATA_DIR)


@pytest.fixture(scope="session")
def mnist(manual_dir, data_dir):
  from kip.data import load_dataset

  return load_dataset("mnist", data_dir=data_dir, manual_dir=manual_dir)


def run_cli(module: str, *args: str, timeout: float = 600, env: dict | None = None):
  """Runs `python -m module args` from the repo root (with `env` added to the environment);
  returns the CompletedProcess."""
  import subprocess

  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
