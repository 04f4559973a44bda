# Two commands set everything up on a fresh machine: `make install`, then `make test`.
# `make demo` runs the whole pipeline on built-in data.

# TFX 1.16 supports Python 3.9-3.10: find a 3.10 even where pyenv's shim is not active.
PYTHON ?= $(shell for p in python3.10 $$HOME/.pyenv/versions/3.10*/bin/python3.10 /root/.pyenv/versions/3.10*/bin/python3.10 /usr/bin/python3.10; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null && { echo $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
# Where the datasets and weights live (see ../shared/README.md); tests skip what needs it when absent.
VISIONTUNE_SHARED ?= $(abspath ../shared)
export VISIONTUNE_SHARED
PYTEST_ARGS ?=
# Test processes (pytest-xdist). Two fit a 2-core machine: most of a test's time keeps one core busy
# (Beam, tracing, Python), so two workers cut the wall time from ~30 to ~12 min (BENCHMARKS.md). Tests
# sharing a run stay on one worker (tests/conftest.py). TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

.PHONY: install test test-fast demo gtsrb clean

install: $(BIN)/visiontune

$(BIN)/visiontune: setup.py pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "error: Python 3.10 not found (TFX 1.16 needs 3.9-3.10); set PYTHON=/path/to/python3.10"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	@touch $@

test: install
	$(PYTEST) $(PYTEST_ARGS)

# Unit tests only: no end-to-end pipeline runs.
test-fast: install
	$(PYTEST) -m "not e2e" $(PYTEST_ARGS)

demo: install
	$(BIN)/visiontune demo --output-dir outputs/demo

gtsrb: install
	$(BIN)/visiontune run --config configs/gtsrb.yaml

clean:
	rm -rf outputs .pytest_cache build *.egg-info
