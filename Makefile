# One way in: `make test` and `make demo` work on a fresh machine (they create .venv, install, build).
#   UE_BUILD_CUDA=0 make test   skips the CUDA kernels for fast local iteration
#   UE_BUILD_CUDA=1 make test   requires them (CI)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
UE_BUILD_CUDA ?= auto
export UE_BUILD_CUDA
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.built-cuda-$(UE_BUILD_CUDA)
SOURCES := setup.py pyproject.toml $(shell find csrc -type f)

.PHONY: build lint test sanitize-sim bench bench-loss rehearse demo info clean gpu-check gpu-wheels

$(PY):
	python3 -m venv $(VENV)

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# UE_BUILD_CUDA=auto (a plain `make bench`, `make demo`) takes an up-to-date UE_BUILD_CUDA=1 build (`make test` in CI
# mode) as it is: the CUDA build has every CPU kernel too, and rebuilding it costs 5-15 minutes.
INSTALL_EDITABLE = MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	@if [ "$(UE_BUILD_CUDA)" = auto ] && [ -f $(VENV)/.built-cuda-1 ] && \
		[ -z "$$(find $(DEPS_STAMP) $(SOURCES) -newer $(VENV)/.built-cuda-1 | head -1)" ]; then \
		echo "make: using the UE_BUILD_CUDA=1 build"; touch $@; \
	else \
		rm -f $(VENV)/.built-cuda-*; \
		echo '$(INSTALL_EDITABLE)'; $(INSTALL_EDITABLE) && touch $@; \
	fi

build: $(BUILD_STAMP)

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .

test: build lint
	$(PY) -m pytest tests -q

# The simulated CUDA kernels (unlearn_engine._C_sim) built with ASan + UBSan, aside in build/sanitize-sim, running
# tests/test_cuda_sim.py: every kernel once, odd shapes. The sanitizer runtimes are preloaded into the Python process.
SANITIZE_DIR := build/sanitize-sim
sanitize-sim: $(DEPS_STAMP)
	UE_SIM_ONLY=1 UE_SIM_SANITIZE=1 MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext \
		--build-lib $(SANITIZE_DIR) --build-temp $(SANITIZE_DIR)/temp
	UE_SIM_LIBRARY=$$(ls $(SANITIZE_DIR)/unlearn_engine/_C_sim*.so) \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(PY) -m pytest tests/test_cuda_sim.py -q -p no:cacheprovider

bench: build
	$(PY) -m pytest bench -q -s --benchmark-columns=min,mean,rounds

# The fused loss against eager and its peers only (interleaved rounds; writes bench/results/<date>-<device>-unlearning_loss*.json).
bench-loss: build
	$(PY) -m pytest bench/test_bench_unlearning_loss.py -q -s -p no:cacheprovider

# On a GPU machine: build for the GPU present, CUDA tests, compute-sanitizer, benchmarks, results JSON
# (scripts/gpu_check.sh). Without a GPU: says so, runs the CPU-side checks, exits with their status.
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) bash scripts/gpu_check.sh

# Wheels the GPU machine lacks (liger-kernel, cut-cross-entropy) into .whl/, to carry there.
gpu-wheels:
	bash scripts/fetch_gpu_wheels.sh

# Scale rehearsal: LLaVA-1.5-7B shapes with 2 layers in bf16 on this machine, projected to 32 layers / 80 GB.
rehearse: build
	$(PY) -m bench.rehearse

demo: build
	$(VENV)/bin/unlearn-engine demo --out demo_out

info: build
	$(VENV)/bin/unlearn-engine info

clean:
	rm -rf build *.egg-info unlearn_engine/_C*.so $(VENV)/.built-cuda-*
