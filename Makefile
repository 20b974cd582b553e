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
# optimised to be measured fairly). Prints tables; see services/bench.
bench: build
	$(CARGO) build --release -p synopsis-bench -p synopsis-generator --bins
	$(CARGO) run --release -p synopsis-bench --bin bench-train
	$(CARGO) run --release -p synopsis-bench --bin bench-generate

fmt:
	$(CARGO) fmt --all
