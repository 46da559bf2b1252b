# One command to install, one to test. PYTHON is the interpreter of the environment to install into.
PYTHON ?= python3


.PHONY: install install-runtime test test-fast lint bench results
install:
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -c requirements.lock -e ".[dev]"

# To run the commands only: no test or lint tools (TensorFlow still comes, for tfds).
install-runtime:
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -c requirements.lock -e ".[data]"

# Everything, end-to-end distillation on real data included (CI; under 15 minutes on 2 cores).
test:
	$(PYTHON) -m pytest -q -n 2 --dist worksteal tests

# Units and references only (no end-to-end runs): under 3 minutes on 2 cores.
test-fast:
	$(PYTHON) -m pytest -q -n 2 --dist worksteal -m "not slow" tests

lint:
	$(PYTHON) -m ruff check kip experiments methods evaluation tests bench

bench:
	$(PYTHON) -m bench.kip_step

# Rewrites tracked files on purpose: the benchmark table (bench/results/benchmark, docs/results.md)
# from its archived cells, running nothing (seconds).
results:
	$(PYTHON) -m bench.results_table
