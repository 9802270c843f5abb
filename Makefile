# Two commands for a fresh Debian 12 machine: `make demo` and `make test`.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=

.PHONY: all setup build test demo bench clean

all: build

setup:
	@bash scripts/setup

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)

build: setup $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j 1

# The main job: how much memory checkpointing saves on a BERT encoder, and
# what it costs in time (sized for a 2-core CPU, about half a minute).
demo: build
	$(BUILD)/remat bench --layers 12 --hidden 256 --heads 4 --seq 256 --batch 8 \
	  --policy none,every-layer,every-2,sqrt,selective-attention --steps 3 --warmup 1

clean:
	rm -rf $(BUILD)
