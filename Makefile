# quant-engine: the two commands a fresh machine needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run stop lint test test-long bench chaos venv clean install uninstall

venv: $(STAMP)

# Reinstall when the packaging changes; the editable install picks up code edits.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

## make run: the demo (private Redis if QE_REDIS_URL is unreachable, the IB simulator, every daemon)
run: $(STAMP)
	$(BIN)/python -m sim.demo start

## make stop: stop everything `make run` started
stop:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m sim.demo stop; fi

## make lint: ruff over the tree, mypy strict on lib/qe (configured in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/mypy

## make test: the lint gate, then the test suite against private redis-servers (never the machine's
## 6379), under 15 minutes on 2 cores: everything but the `long` tests
test: lint
	$(BIN)/python -m pytest -q -m "not long"

## make test-long: the whole simulated afternoons (scenarios, no flapping, quiet books, replay
## identity, the end-of-day report in Chromium) and the systemd boot, ~15 minutes more
test-long: $(STAMP)
	$(BIN)/python -m pytest -q -m long

## make bench: every benchmark (each ends with one RESULT line); the pipeline runs its
## --quick version here (the full 1,000-symbol one: .venv/bin/python bench/pipeline.py)
bench: $(STAMP)
	@for b in bench/*.py; do \
	  case $$b in *_support.py) continue;; esac; \
	  args=""; [ "$$b" = bench/pipeline.py ] && args="--quick"; \
	  echo "== $$b $$args"; $(BIN)/python $$b $$args || exit 1; \
	done

## make chaos: one simulated afternoon under faults, the simulator as referee (control run, then faulted; docs/chaos.md)
chaos: $(STAMP)
	$(BIN)/python -m sim.chaos --with-control $(CHAOS_ARGS)

## make install: as root, install on this host under systemd (service user, /opt/quant-engine/.venv,
## /etc/quant-engine, Redis ACL users, units; idempotent). Variables: systemd/install.sh, walk-through: systemd/README.md
install:
	systemd/install.sh install

## make uninstall: as root, remove what `make install` installed (KEEP_CONFIG=1 keeps /etc/quant-engine)
uninstall:
	systemd/install.sh uninstall

clean:
	rm -rf $(VENV) run build *.egg-info
