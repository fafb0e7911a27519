# Each target sets itself up: a virtual environment in .venv (never the system interpreter).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-oldest lint bench clean

# The library alone: all the demo needs.
$(VENV)/.installed-lib: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# Its development tools (dependency groups need pip 25.1+, hence the upgrade above).
$(VENV)/.installed: $(VENV)/.installed-lib
	$(PY) -m pip install --quiet -e . --group test --group lint
	touch $@

# The ML extras the integration tests need. torch first, pinned: the CPU build on this machine's
# disk; lightning then finds it satisfied instead of fetching a CUDA build.
$(VENV)/.installed-ml: $(VENV)/.installed
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[ml]' --group test --group lint
	touch $@

demo: $(VENV)/.installed-lib
	$(PY) examples/demo.py

lint: $(VENV)/.installed-ml
	$(PY) -m ruff check checkpointio tests examples benchmarks
	$(PY) -m ruff format --check checkpointio tests examples benchmarks
	$(PY) -m mypy

test: lint
	$(PY) -m pytest

# The suite on the oldest Python that pyproject.toml admits (no ML extras: those tests skip), in its
# own environment: keeps `requires-python` honest. CI passes the interpreter's path.
PYTHON_OLDEST ?= python3.10
test-oldest:
	$(MAKE) --no-print-directory PYTHON=$(PYTHON_OLDEST) VENV=.venv-oldest .venv-oldest/.installed
	.venv-oldest/bin/python -m pytest

# pigz and igzip rows need `apt-get install -y pigz isal`; without them those rows are skipped.
# The DCP benchmark (benchmarks/dcpbench.py) needs torch, hence the ML extras.
bench: $(VENV)/.installed-ml
	$(PY) -m pip install --quiet --group bench
	$(PY) benchmarks/run.py --quick
	$(PY) benchmarks/dcpbench.py --quick
	$(PY) benchmarks/incremental.py --quick
	$(PY) benchmarks/partial.py --quick

clean:
	rm -rf $(VENV) .venv-oldest .pytest_cache .mypy_cache .ruff_cache .checkpointio
