# Two set-up commands: `make demo` and `make test`. Both build .venv from scratch when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= data

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps re-run the install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/sharetune data fetch mnist --root $(DATA)
	$(BIN)/sharetune search weight-sharing --set data.root=$(DATA)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest tests

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_arbnet.py
	$(BIN)/python benchmarks/bench_spin.py

clean:
	rm -rf $(VENV)
