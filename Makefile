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

fmt:
	$(CARGO) fmt --all
