# `make test` and `make up` work on a fresh machine: each builds .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU wheel of torch comes from local disk; pinning it keeps every later install off CUDA wheels.
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: help setup test up clients lint format clean

help:
	@echo "make up     set up .venv and start the whole stack (disagg up) on a tiny built-in model"
	@echo "make test   set up .venv and run the test suite"
	@echo "make clients  lm-eval, guidellm and the openai SDK against disagg up (own venv)"
	@echo "make lint   ruff check + format check"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e '.[test,dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

up: $(STAMP)
	$(VENV)/bin/disagg up

clients:
	bash tests/clients/run.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check services shared kernels cli tests benchmarks
	$(VENV)/bin/ruff format --check services shared kernels cli tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format services shared kernels cli tests benchmarks
	$(VENV)/bin/ruff check --fix services shared kernels cli tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
