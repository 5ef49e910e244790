# Set-up, main job and tests on a fresh machine (Debian, Python 3.10+). `make run` / `make test` do it all.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run quickstart test lint test-all

setup: $(VENV)/.installed

# pip --isolated: use the package registry, not the machine's pip config (whose local CPU-only torch wheel
# does not work with the registry's torchvision). Fashion-MNIST comes from Debian's dataset-fashion-mnist.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --isolated -q --upgrade pip
	$(BIN)/pip install --isolated -q -e ".[test]"
	-@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; fi
	touch $@

# the main job: baseline -> Network Slimming (torch-pruning) -> SWP on Fashion-MNIST, about 10 min on 2 cores
run: setup
	$(BIN)/python examples/continual_prune.py --json runs/continual_prune/result.json

quickstart: setup
	$(BIN)/python examples/quickstart.py

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: setup
	$(BIN)/ruff check .
