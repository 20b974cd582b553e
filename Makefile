# Everything a user or CI runs goes through here; libtorch is set up on first use.
SHELL := /bin/bash
VENV := $(shell scripts/setup-torch.sh)
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)
export SYNOPSIS_PYTHON := $(VENV)/bin/python
CARGO ?= cargo

.PHONY: all build test demo lint fmt clean

all: build

build:
	$(CARGO) build --workspace --all-targets

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: build
	$(CARGO) test --workspace -- --test-threads=2

demo:
	scripts/demo.sh

# Benchmarks against the Python references (release: the per-token Rust work of decoding must be
# optimised to be measured fairly). Prints tables; see docs/performance.md. bench-train needs a
# corpus that the repository does not hold: `make bench DATA_ROOT=DIR` (or SYNOPSIS_DATA_ROOT).
bench: build
	$(CARGO) build --release -p synopsis-bench -p synopsis-generator --bins
	$(CARGO) run --release -p synopsis-bench --bin bench-train -- $(if $(DATA_ROOT),--data-root $(DATA_ROOT))
	$(CARGO) run --release -p synopsis-bench --bin bench-generate

fmt:
	$(CARGO) fmt --all

# Bounded loopback load test of one generator (not part of `make test`):
# make load-test LOAD_TEST_ARGS="--streams 64 --seconds 60 --swap-every 10"
.PHONY: load-test
load-test:
	$(CARGO) build -p synopsis-trainer -p synopsis-generator -p synopsis-tests --bins
	$(CARGO) run -p synopsis-tests --bin load_test -- $(LOAD_TEST_ARGS)

# The kit of the GPU check (scripts/gpu-check.sh): built here, carried to a GPU machine as
# target/gpu-check, run there with `scripts/gpu-check.sh run`.
.PHONY: gpu-check-prepare
gpu-check-prepare:
	scripts/gpu-check.sh prepare
