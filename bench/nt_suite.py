"""Run neural-tangents 0.6.5's own test suite on current JAX through `kip._compat`.

neural-tangents' tests are not part of this repository (nor of its wheel); its source release has
them. This copies the release's `tests/` folder to a temporary directory, next to a
`conftest.py` that imports `kip._compat` before anything imports neural-tangents, puts back
`jax.tree_map` (removed in JAX 0.6) for NT's test helpers only, and marks NT's absl flags as
parsed; then runs pytest there.

  pip download neural-tangents==0.6.5 --no-deps --no-binary :all: -d /tmp/nt
  tar xzf /tmp/nt/neural-tangents-0.6.5.tar.gz -C /tmp/nt
  python -m bench.nt_suite /tmp/nt/neural-tangents-0.6.5        # stax, batching, MC, predict
  python -m bench.nt_suite /tmp/nt/neural-tangents-0.6.5 tests/empirical_test.py -k Structured

NT samples `NT_NUM_GENERATED_CASES` (default 4) cases per parameterised test. Extra arguments go
to pytest; the exit status is pytest's.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

DEFAULT_FILES = ("tests/stax/stax_test.py", "tests/batching_test.py",
                 "tests/monte_carlo_test.py", "tests/predict_test.py")

CONFTEST = '''"""Written by kip's bench/nt_suite.py: neural-tangents' tests through kip._compat."""
import jax

import kip._compat  # noqa: F401  (before any neural_tangents import)

# NT's tests/test_utils.py still calls `jax.tree_map`, removed in JAX 0.6; only its tests need it.
jax.tree_map = jax.tree_util.tree_map

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # NT's test flags, read at collection time, keep their defaults
'''


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("source", type=pathlib.Path,
                      help="unpacked neural-tangents 0.6.5 source release (has tests/)")
  parser.add_argument("pytest_args", nargs=argparse.REMAINDER,
                      help=f"test files and pytest options (default: {' '.join(DEFAULT_FILES)})")
  args = parser.parse_args(argv)
  tests = args.source / "tests"
  if not (tests / "test_utils.py").is_file():
    parser.exit(2, f"error: {tests} is not neural-tangents' tests folder; unpack the sdist "
                   "(see --help)\n")
  pytest_args = args.pytest_args or list(DEFAULT_FILES)
  if not any(a.endswith(".py") for a in pytest_args):
    pytest_args = list(DEFAULT_FILES) + pytest_args
  with tempfile.TemporaryDirectory(prefix="nt_suite_") as work:
    shutil.copytree(tests, pathlib.Path(work) / "tests")
    (pathlib.Path(work) / "conftest.py").write_text(CONFTEST)
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEx",
               *pytest_args]
    print(" ".join(command), flush=True)
    return subprocess.run(command, cwd=work, env=env, check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
