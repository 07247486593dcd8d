# Two commands do all the setup on a fresh machine:
#   make demo   create .venv, install, and pretrain a real model end to end
#   make test   create .venv, install, and run the test suite
#   make lint   ruff and mypy, as CI runs them
# The demo reads DEMO_CORPUS (default: the Wikipedia sample in data/, see data/README.md),
# trains for DEMO_STEPS steps (or DEMO_BUDGET=10m of training time instead) and writes to
# DEMO_OUT. Run `make demo` again after an interruption and it continues where it stopped;
# a finished demo is kept, and a new one goes to DEMO_OUT-2, DEMO_OUT-3, ...
# Both commands install into .venv: run the CLI as .venv/bin/bertforge, or
# `source .venv/bin/activate` first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

DEMO_CORPUS ?= data/enwiki-2015-sample.txt.xz
DEMO_CORPUS_OPTIONS ?=
DEMO_STEPS ?= 3600
DEMO_BUDGET ?=
DEMO_VOCAB ?= 8192
DEMO_OUT ?= runs/demo

.PHONY: install demo test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned and installed first: an unpinned torch would pull the CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	@DEMO_CORPUS="$(DEMO_CORPUS)" DEMO_CORPUS_OPTIONS="$(DEMO_CORPUS_OPTIONS)" \
		DEMO_STEPS="$(DEMO_STEPS)" DEMO_BUDGET="$(DEMO_BUDGET)" DEMO_VOCAB="$(DEMO_VOCAB)" \
		DEMO_OUT="$(DEMO_OUT)" BIN="$(BIN)" bash scripts/demo.sh

# The suite in TEST_WORKERS processes (pytest-xdist); TEST_WORKERS=0 runs it in this one.
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# ruff (lint and format check) over the code, mypy over the package: pyproject.toml sets both.
lint: install
	$(BIN)/ruff check bertforge tests scripts benchmarks
	$(BIN)/ruff format --check bertforge tests scripts benchmarks
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix bertforge tests scripts benchmarks
	$(BIN)/ruff format bertforge tests scripts benchmarks

clean:
	rm -rf $(VENV) runs
