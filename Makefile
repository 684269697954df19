# Two entry points do all set-up on first use: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Prefect state stays inside the project, never in the user's home; no telemetry.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-fast install clean

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Python 3.11 or newer is needed, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing into $(VENV) (first run only: about 3 GB, a few minutes)..."
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -m pip install --quiet -e ".[test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	@touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/cxr-screen demo

# One pytest process per core (at most 4); a test file stays on one process, as the stack tests share one stack.
test: $(BIN)/.installed
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) .prefect .pytest_cache
