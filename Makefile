# Two commands for a fresh Debian 12 machine: `make demo` and `make test`.
#
# TORCH picks the LibTorch:
#   TORCH=1  Debian's libtorch-dev 1.13.1 (CPU), the default
#   TORCH=2  PyPI's torch 2.15.0 wheel (a CUDA 13.2 build; runs on the CPU
#            where there is no GPU), installed by scripts/setup into
#            REMAT_VENV with transformers, the peer the tests compare with
# Each leg has its own build folder, so both can be built side by side.
TORCH ?= 1
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=
REMAT_VENV ?= $(HOME)/.cache/remat/torch2-venv
export REMAT_VENV

ifeq ($(TORCH),1)
BUILD ?= build
TORCH_CMAKE_ARGS :=
else ifeq ($(TORCH),2)
BUILD ?= build-torch2
# Evaluated by the shell when cmake runs, after setup made the venv.
TORCH_CMAKE_ARGS := -DCMAKE_PREFIX_PATH="$$($(REMAT_VENV)/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  -DREMAT_PYTHON=$(REMAT_VENV)/bin/python
else
$(error TORCH: expected 1 (LibTorch 1.13) or 2 (LibTorch 2.15), but got '$(TORCH)')
endif

.PHONY: all setup configure build test demo consumer clean print-build figures \
  build-sanitize test-sanitize fuzz fuzz-ci hostile

all: build

setup:
	@bash scripts/setup $(TORCH)

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(TORCH_CMAKE_ARGS) $(CMAKE_ARGS)

configure: setup $(BUILD)/CMakeCache.txt

build: configure
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)
	@$(MAKE) --no-print-directory consumer

# Installs remat into $(BUILD)/install and builds examples/consumer, a project
# of its own, against it with find_package(remat) (which finds the LibTorch
# remat was built with); then runs it.
consumer: build
	cmake --install $(BUILD) --prefix $(BUILD)/install >/dev/null
	cmake -S examples/consumer -B $(BUILD)/consumer -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$(abspath $(BUILD))/install" >/dev/null
	cmake --build $(BUILD)/consumer -j $(JOBS)
	$(BUILD)/consumer/consumer

# The main job: how much memory checkpointing saves on a BERT encoder, and
# what it costs in time (sized for a 2-core CPU). Builds only the CLI.
demo: configure
	cmake --build $(BUILD) -j $(JOBS) --target remat_cli
	$(BUILD)/remat bench --layers 12 --hidden 256 --heads 4 --seq 256 --batch 8 \
	  --policy none,every-layer,every-2,sqrt,selective-attention --steps 3 --warmup 1

# Every measured figure block of README.md and docs/ (between
# "<!-- figure: NAME -->" markers), measured again and rewritten by
# scripts/figures.py (several minutes on 2 cores).
figures: configure
	cmake --build $(BUILD) -j $(JOBS) --target remat_cli
	python3 scripts/figures.py --remat $(BUILD)/remat

# Several hundred crafted inputs (huge sizes and counts, damaged and crafted
# files) against every command; prints a table by kind and fails if any case
# crashes, hangs past 10 s, passes 1 GiB or answers unclearly.
hostile: build
	python3 tests/hostile/hostile.py --remat $(BUILD)/remat

clean:
	rm -rf $(BUILD)

# ------------------------------------------------- sanitizers and fuzzing
# One clang build in $(SAN_BUILD) with AddressSanitizer and
# UndefinedBehaviorSanitizer on remat, its tests, the CLI and the libFuzzer
# harnesses of fuzz/ (LibTorch 1.13, uninstrumented). Leaks are checked;
# tests/sanitizer/lsan.supp lists the LibTorch frames whose leaks are not ours.
#   make test-sanitize    the tests of SANITIZE_TEST_DIRS (folders or files
#                         under tests/; empty: all), then each harness for
#                         FUZZ_CI_SECONDS (CI's third leg)
#   make fuzz             each harness for FUZZ_SECONDS, one after the other
SAN_BUILD ?= build-asan
SANITIZE_TEST_DIRS ?= checkpoint;memory;io;train;cli/train_cli_test.cpp
FUZZ_SECONDS ?= 300
FUZZ_CI_SECONDS ?= 30
SAN_CXX ?= clang++-14

build-sanitize test-sanitize fuzz fuzz-ci: export ASAN_OPTIONS = detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1
build-sanitize test-sanitize fuzz fuzz-ci: export LSAN_OPTIONS = suppressions=$(CURDIR)/tests/sanitizer/lsan.supp:print_suppressions=0
build-sanitize test-sanitize fuzz fuzz-ci: export UBSAN_OPTIONS = print_stacktrace=1:halt_on_error=1
build-sanitize test-sanitize fuzz fuzz-ci: export ASAN_SYMBOLIZER_PATH = /usr/lib/llvm-14/bin/llvm-symbolizer

# Configured every time (a second when nothing changed), so that a new
# SANITIZE_TEST_DIRS takes effect.
build-sanitize: setup
	CXX=$(SAN_CXX) cmake -S . -B $(SAN_BUILD) -DCMAKE_BUILD_TYPE=Release \
	  -DREMAT_BUILD_FUZZ=ON -DREMAT_BUILD_BENCH=OFF \
	  -DREMAT_TEST_DIRS="$(SANITIZE_TEST_DIRS)" $(CMAKE_ARGS) >/dev/null
	cmake --build $(SAN_BUILD) -j $(JOBS)

test-sanitize: build-sanitize
	cd $(SAN_BUILD) && ctest --output-on-failure -j $(JOBS)
	@$(MAKE) --no-print-directory fuzz-ci

fuzz-ci: build-sanitize
	bash scripts/fuzz $(SAN_BUILD) $(FUZZ_CI_SECONDS)

fuzz: build-sanitize
	bash scripts/fuzz $(SAN_BUILD) $(FUZZ_SECONDS)
