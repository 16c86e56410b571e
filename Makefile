# `make demo` and `make test` each build .venv on first use (python3 -m venv + pip).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_HOME := $(CURDIR)/.tuneline/prefect
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test lint typecheck bench clean

venv: $(STAMP)

# The ray extra is installed too, so that tests/engines/ runs (about 300 MB and 16 s more).
# torch is installed first, pinned, so pip takes the CPU build from this machine's disk
# instead of a multi-GB CUDA build that a bare range would pull.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0" || $(BIN)/pip install --quiet "torch>=2.4,<3"
	$(BIN)/pip install --quiet -e ".[server,gateway,ray,dev]"
	touch $(STAMP)

# Prefect creates its home folder without parents: make it first (a fresh clone has no .tuneline/).
demo: $(STAMP)
	mkdir -p $(PREFECT_HOME)
	$(BIN)/tuneline demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The slowest tests are printed at the end, so that every run (CI's too) shows where the suite's time goes.
test: lint typecheck
	mkdir -p $(PREFECT_HOME)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/data_plane.py 100000

clean:
	rm -rf .tuneline out
