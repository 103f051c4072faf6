# airflow-comet developer commands (GNU make).
#
#   make test               venv for Airflow $(AIRFLOW) (default 3.3) from the lock file, lint (3.3), then pytest
#   make lint               ruff check, ruff format --check and mypy on airflow_comet/ (pinned in the lock)
#   make test AIRFLOW=2.11  the same against Airflow 2.11
#   make test-all           Airflow 2.11, then Airflow 3.3 (what CI runs)
#   make demo               runs python -m airflow_comet.demo (the nightly batch example on the simulator)
#   make lock               regenerates requirements/airflow-*.txt from requirements/airflow-*.in
#   make clean              removes .venv/ and output/
#
# Only python3 (3.11, the lock files are compiled for it), make and access to PyPI are needed.

AIRFLOW ?= 3.3
PYTHON ?= python3
PYTEST_ARGS ?= -q
AIRFLOW_VERSIONS := 2.11 3.3
LOCK_PYTHON_VERSION := 3.11

VENV := .venv/airflow-$(AIRFLOW)
LOCK := requirements/airflow-$(AIRFLOW).txt
STAMP := $(VENV)/.installed
UV := $(VENV)/bin/uv
# uv is bootstrapped at the version pinned in the lock file.
UV_VERSION = $(shell sed -n 's/^uv==\([^ ;]*\).*/\1/p' $(LOCK))

TEST_HOME := $(CURDIR)/.venv/airflow-home-$(AIRFLOW)
DEMO_HOME := $(CURDIR)/.venv/airflow-home-demo

SHELL := /bin/bash

.DEFAULT_GOAL := test
.PHONY: venv test test-all demo lock clean lint

ifeq ($(wildcard $(LOCK)),)
$(error No lock file $(LOCK) (AIRFLOW=$(AIRFLOW)); supported: $(AIRFLOW_VERSIONS))
endif

# Wipes an Airflow home, points Airflow at it and creates its SQLite metadata DB.
# $(1) = AIRFLOW_HOME directory. Used as a prefix of the command that needs it.
define airflow_home
rm -rf "$(1)" && mkdir -p "$(1)" && \
export AIRFLOW_HOME="$(1)" AIRFLOW__CORE__LOAD_EXAMPLES=False && \
echo "==> airflow db migrate (AIRFLOW_HOME=$(1))" && \
{ $(VENV)/bin/airflow db migrate >"$(1)/db-migrate.log" 2>&1 || \
  { cat "$(1)/db-migrate.log"; echo "airflow db migrate failed" >&2; exit 1; }; } &&
endef

venv: $(STAMP)

# The venv plus uv at the locked version.
$(UV): $(LOCK)
	@if [ ! -x $(VENV)/bin/python ]; then \
	  echo "==> Creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version 2>&1))"; \
	  $(PYTHON) -m venv $(VENV); \
	fi
	@v=$$($(VENV)/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	  [ "$$v" = "$(LOCK_PYTHON_VERSION)" ] || \
	  echo "WARNING: $(VENV) uses Python $$v, the lock files are compiled for Python $(LOCK_PYTHON_VERSION)" >&2
	@echo "==> Installing uv==$(UV_VERSION) into $(VENV)"
	@$(VENV)/bin/python -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"
	@touch $@

# Everything in the lock (exactly: extra packages are removed), then this repo editable.
$(STAMP): $(LOCK) pyproject.toml $(UV)
	@echo "==> Syncing $(VENV) with $(LOCK)"
	@VIRTUAL_ENV=$(VENV) $(UV) pip sync -q --python $(VENV)/bin/python $(LOCK)
	@echo "==> Installing airflow-comet (editable, no deps) into $(VENV)"
	@VIRTUAL_ENV=$(VENV) $(UV) pip install -q --python $(VENV)/bin/python --no-deps -e .
	@touch $@

# Lint and types are checked once, in the Airflow 3.3 venv (mypy's view of Airflow's own types is 3.3's).
lint: $(STAMP)
	@echo "==> ruff check, ruff format --check, mypy (airflow_comet/)"
	@$(VENV)/bin/ruff check airflow_comet && $(VENV)/bin/ruff format --check airflow_comet && $(VENV)/bin/mypy

test: $(STAMP)
	@if [ "$(AIRFLOW)" = 3.3 ]; then $(MAKE) --no-print-directory lint AIRFLOW=3.3; fi
	@$(call airflow_home,$(TEST_HOME)) \
	echo "==> pytest $(PYTEST_ARGS) (Airflow $$($(VENV)/bin/python -c 'from importlib.metadata import version; print(version("apache-airflow"))'))" && \
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Same as `$(MAKE) test AIRFLOW=2.11 && $(MAKE) test AIRFLOW=3.3`, with the time each took.
test-all:
	@for v in $(AIRFLOW_VERSIONS); do \
	  start=$$(date +%s); \
	  echo "==> make test AIRFLOW=$$v"; \
	  $(MAKE) --no-print-directory test AIRFLOW=$$v || { echo "==> Airflow $$v: FAILED after $$(( $$(date +%s) - start ))s" >&2; exit 1; }; \
	  echo "==> Airflow $$v: passed in $$(( $$(date +%s) - start ))s"; \
	done

# COMETAPI_KEY, if set, is inherited from the environment.
demo: $(STAMP)
	@$(call airflow_home,$(DEMO_HOME)) \
	echo "==> python -m airflow_comet.demo" && \
	$(VENV)/bin/python -m airflow_comet.demo

# Uses the uv pinned in the lock (bootstrapped into $(VENV) if needed). Keeps the current
# pins where they still satisfy the .in file; `make lock LOCK_ARGS=--upgrade` takes the newest
# versions. A lock file is only rewritten when its content changes (so venvs stay up to date).
LOCK_ARGS ?=
lock: $(UV)
	@set -e; for v in $(AIRFLOW_VERSIONS); do \
	  out=requirements/airflow-$$v.txt; tmp=$$(mktemp); \
	  [ ! -f $$out ] || cp $$out $$tmp; \
	  echo "==> uv pip compile requirements/airflow-$$v.in -> $$out"; \
	  $(UV) pip compile -q --python-version $(LOCK_PYTHON_VERSION) --custom-compile-command "make lock" \
	    $(LOCK_ARGS) requirements/airflow-$$v.in -o $$tmp || { rm -f $$tmp; exit 1; }; \
	  if cmp -s $$tmp $$out; then echo "    unchanged"; rm -f $$tmp; else mv $$tmp $$out; chmod 644 $$out; echo "    updated"; fi; \
	done

clean:
	rm -rf .venv output

# Only the reliability scenarios of docs/reliability.md (also part of `make test`), with their output (-s).
.PHONY: reliability
reliability: $(STAMP)
	@$(call airflow_home,$(TEST_HOME)) \
	$(VENV)/bin/python -m pytest -q -s tests/reliability
