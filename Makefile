# Each target sets itself up: a virtual environment in .venv (never the system interpreter).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

# The library and its test tools: all the demo needs.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The ML extras the integration tests need. torch first, pinned: the CPU build on this machine's
# disk; lightning then finds it satisfied instead of fetching a CUDA build.
$(VENV)/.installed-ml: $(VENV)/.installed
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,ml]'
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

lint: $(VENV)/.installed-ml
	$(PY) -m ruff check checkpointio tests examples benchmarks
	$(PY) -m ruff format --check checkpointio tests examples benchmarks
	$(PY) -m mypy

test: lint
	$(PY) -m pytest

# pigz and igzip rows need `apt-get install -y pigz isal`; without them those rows are skipped.
bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/run.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .checkpointio
