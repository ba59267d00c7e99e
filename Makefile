# `make demo` and `make test` are all a newcomer needs; see README.md.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp

.PHONY: help setup system lint test demo up down status bench

help:
	@echo "make setup   system packages (mosquitto, postgresql) and .venv/"
	@echo "make test    lint, type-check and run every test"
	@echo "make lint    ruff check, ruff format --check, mypy"
	@echo "make demo    start the local stack, run the simulator's demo, stop the stack"
	@echo "make up      start the local stack in the background (settings in .run/stack.env)"
	@echo "make down    stop the local stack (its data stays in .run/)"
	@echo "make status  show what of the local stack runs"
	@echo "make bench   run the benchmarks"

setup: system $(STAMP)

system:
	@PYTHON='$(PYTHON)' scripts/setup-system.sh

# Reinstall only when pyproject.toml changed since the last install.
$(STAMP): pyproject.toml | system
	@if [ -x $(BIN)/python ] && ! $(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then \
		echo "$(VENV) is not Python 3.11: recreating it"; rm -rf $(VENV); fi
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy service firmware_sim

# pytest exits 5 when it collects no tests: not a failure for an empty tree.
test: lint
	@rc=0; $(BIN)/pytest || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; \
	exit $$rc

demo: setup
	scripts/demo.sh

up: setup
	$(BIN)/chargeshare stack up

down:
	@if [ -x $(BIN)/chargeshare ]; then $(BIN)/chargeshare stack down; \
	else echo "no $(BIN)/chargeshare: nothing to stop"; fi

status:
	@$(BIN)/chargeshare stack status

bench: setup
	@$(BIN)/python -c 'import matplotlib' 2>/dev/null || \
		$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	$(BIN)/python -m bench
