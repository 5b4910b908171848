# Two set-up commands: `make demo` and `make test`. Both build .venv from scratch when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= data

.PHONY: demo test bench clean postgres chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The image's exact versions (docker/requirements.lock) constrain every install, so tests run what
# the image runs; stamps re-run the install whenever pyproject.toml or the lock changes.
LOCK := docker/requirements.lock
$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e . -c $(LOCK)
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]' -c $(LOCK)
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/sharetune data fetch mnist --root $(DATA)
	$(BIN)/sharetune search weight-sharing --set data.root=$(DATA)

# Two pytest-xdist workers, as many as the build machines' cores. A module whose tests share a search
# or a local Ray is one xdist_group, run on one worker (else each worker would build it again);
# the rest go test by test, slow ones first (conftest.py), in that order.
test: $(VENV)/.installed-dev postgres chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -n 2 --dist loadgroup --no-loadscope-reorder

# The cluster test runs a real PostgreSQL server: install Debian's when it is missing (as root).
postgres:
	@command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "note: no PostgreSQL server here; the cluster test will be skipped"

# The results test renders the MLflow comparison in a real browser: install Debian's Chromium when missing.
chromium:
	@command -v chromium >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: no Chromium here; the browser test will be skipped"

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_arbnet.py
	$(BIN)/python benchmarks/bench_spin.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_checkpoint.py
	$(BIN)/python benchmarks/bench_hashes.py
	$(BIN)/python benchmarks/bench_storage.py
	$(BIN)/python benchmarks/bench_ddp.py
	$(BIN)/python benchmarks/bench_search.py  # about 15 minutes: hypervolume against epochs, training share

clean:
	rm -rf $(VENV)
