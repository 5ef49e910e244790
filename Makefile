# Set-up, main job and tests on a fresh machine (Debian, Python 3.10+). `make run` / `make test` do it all.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run quickstart test lint test-all sanitize

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

# Memory safety (docs/memory_safety.md): the stripe kernel built with ASan + UBSan + its range checks (SWP_SANITIZE=1),
# native, AVX2 (on an AVX-512 CPU: its AVX2 micro-kernels) and generic builds; the kernel tests, the fuzz, the loader
# fuzz and a one-process model sweep run under it.
SAN_ENV = SWP_SANITIZE=1 LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 PYTHONWARNINGS=ignore
sanitize: setup
	archs="native generic"; grep -qw avx512f /proc/cpuinfo 2>/dev/null && archs="native avx2 generic"; \
	for arch in $$archs; do \
	  $(SAN_ENV) SWP_KERNEL_ARCH=$$arch $(BIN)/python -m swp_plugin.testing.fuzz --cases 1000 --seed 2 || exit 1; \
	  $(SAN_ENV) SWP_KERNEL_ARCH=$$arch $(BIN)/python -m swp_plugin.testing.loader_fuzz --cases 1000 --seed 1 || exit 1; \
	  $(SAN_ENV) SWP_KERNEL_ARCH=$$arch $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_stripe_conv.py \
	    tests/test_deploy.py tests/test_deploy_forward.py tests/test_pooling.py -k "not timm" || exit 1; \
	done
	$(SAN_ENV) $(BIN)/python -m swp_plugin.testing.sweep --models \
	  resnet18,resnet18d,mobilenetv3_small_050,densenet121,dla34,regnetx_002,ghostnet_050,tf_efficientnet_b0,mixnet_s,repvgg_a0
