# Two commands do all the setup on a fresh machine:
#   make demo   create .venv, install, and pretrain a real model end to end
#   make test   create .venv, install, and run the test suite
# The demo reads DEMO_CORPUS (default: the Wikipedia sample beside this repository) and
# writes to DEMO_OUT; an earlier demo there is kept, and the new one goes to the first free
# DEMO_OUT-2, DEMO_OUT-3, ...  Both commands install into .venv: run the CLI as
# .venv/bin/bertforge, or `source .venv/bin/activate` first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

DEMO_CORPUS ?= ../shared/data/enwiki-2015-wikiextractor-sample
DEMO_BUDGET ?= 10m
DEMO_OUT ?= runs/demo

.PHONY: install demo test clean

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
	@DEMO_CORPUS="$(DEMO_CORPUS)" DEMO_BUDGET="$(DEMO_BUDGET)" DEMO_OUT="$(DEMO_OUT)" \
		BIN="$(BIN)" bash scripts/demo.sh

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
