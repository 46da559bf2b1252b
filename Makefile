# One command to install, one to test. PYTHON is the interpreter of the environment to install into.
PYTHON ?= python3


.PHONY: install test lint bench
install:
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -c requirements.lock -e ".[dev]"

test:
	$(PYTHON) -m pytest -q -n 2 --dist worksteal tests

lint:
	$(PYTHON) -m ruff check kip experiments methods tests bench

bench:
	$(PYTHON) -m bench.kip_step
