# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs the project, runs the whole pipeline on the tiny preset
#   make test   the same set-up, then the whole test suite
# On a GPU machine the pin installs PyPI's CUDA build; another torch (>= 2.6) with `make demo TORCH_SPEC="torch==2.X.Y"`.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-16)
# The venv's tools first: DeepSpeed's JIT build of its CPU op must always see the same ninja.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test lint setup clean bench bench-quick bench-gpu

setup: $(STAMP)

# Reinstalls only when pyproject.toml changed (the stamp carries its hash).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m launch.demo

# Two pytest workers share the cores; a module's tests (and its module fixtures) stay on one worker.
TEST_WORKERS ?= 2
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# CPU benchmarks -> docs/benchmarks.md (bench-quick: tiny sizes, checks the harness only).
bench: $(STAMP)
	$(BIN)/python bench/suite.py

bench-quick: $(STAMP)
	$(BIN)/python bench/suite.py --quick --out runs/benchmarks-quick.md

# GPU checks, a bare loop and `slm train` at 125m/350m (ZeRO 0-3, resume, document masks, compile, Muon),
# appended to docs/benchmarks.md; exits 2 without CUDA (`python bench/gpu.py --cpu-smoke` checks the harness).
bench-gpu: $(STAMP)
	$(BIN)/python bench/gpu.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs data/prepared
