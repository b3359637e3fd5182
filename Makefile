# lipnext — set-up, demo and tests on a fresh machine (Python >= 3.10).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; override TORCH for another build (e.g. TORCH='torch>=2.3').
TORCH  ?= torch==2.13.0
EXTRAS ?= demo,log,test,bench,hub,export,wandb,mlflow
STAMP  := $(VENV)/.installed

.PHONY: install demo shell test test-quick bench gpu-check clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --quiet --no-deps "torchattacks>=3.5"  # extra 'attacks': its torchvision pin would replace the CPU torch
	touch $(STAMP)

install: $(STAMP)

# --overwrite: `make demo` again replaces runs/demo (it says so); lipnext lives in $(VENV)
demo: $(STAMP)
	$(BIN)/lipnext demo --overwrite
	@echo "lipnext is installed in $(VENV): run '. $(VENV)/bin/activate' (or 'make shell') to put it on PATH, or call $(BIN)/lipnext"

# a shell with $(VENV) active: lipnext on PATH
shell: $(STAMP)
	@echo "lipnext is on PATH in this shell ($(VENV) active); 'exit' leaves it"
	@. $(BIN)/activate && exec $${SHELL:-/bin/sh}

# everything CI can run; prints each test of the slow and distributed groups and the 15 slowest
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not distributed" --durations=15
	$(BIN)/python -m pytest -m "slow or distributed" -v --durations=15

# for development: the quick tests only (no slow, no torchrun tests)
test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not distributed" --durations=10

bench: $(STAMP)
	$(BIN)/lipnext bench step

# the GPU check (docs/BENCHMARKS.md, GPU check) on a machine with CUDA: its own torch, no venv;
# omegaconf must be importable (there: pip install --no-deps --target, see the docs)
GPU_OUT    ?= runs/gpu
GPU_BUDGET ?= 470
gpu-check:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m lipnext.cli bench gpu --out $(GPU_OUT) --budget $(GPU_BUDGET)

clean:
	rm -rf $(VENV) runs .pytest_cache
