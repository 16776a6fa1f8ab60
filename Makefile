# Thin wrappers; `make run` and `make test` install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8080
# Below the 10 s that `docker stop` and most supervisors wait: in-flight requests get this
# long to finish, then streams still running are cut (and recorded with status 503).
GRACEFUL_TIMEOUT ?= 8

.PHONY: install run fmt lint typecheck test faults check clean bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# `python -m crabtrio` runs `hypercorn crabtrio:app --worker-class trio` after checking the
# config and the audit file, and exits non-zero when a worker fails to start.
run: install
	$(BIN)/python -m crabtrio --bind $(HOST):$(PORT) --graceful-timeout $(GRACEFUL_TIMEOUT)

fmt: install
	$(BIN)/ruff format crabtrio tests bench

lint: install
	$(BIN)/ruff format --check crabtrio tests bench
	$(BIN)/ruff check crabtrio tests bench

typecheck: install
	$(BIN)/mypy

test: install
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage report --skip-covered --show-missing

# The fault-injection tests alone (they also run in `make test`).
faults: install
	$(BIN)/python -m pytest -m faults

check: lint typecheck test

clean:
	rm -rf $(VENV) .coverage .mypy_cache .ruff_cache .pytest_cache

# Load benchmarks with wrk (not part of `make test`): QUICK=1 for a ~2-minute subset,
# PEERS=litellm,portkey to run the peer gateways side by side (installed under bench/.peers/),
# BASELINE=<git ref> to run that commit's crabtrio beside the checkout's (crabtrio-baseline).
BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py $(if $(filter-out 0,$(QUICK)),--quick) $(if $(PEERS),--peers $(PEERS)) $(if $(BASELINE),--baseline $(BASELINE))
