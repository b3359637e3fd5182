# lipnext — set-up, demo and tests on a fresh machine (Python >= 3.10).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; override TORCH for another build (e.g. TORCH='torch>=2.3').
TORCH  ?= torch==2.13.0
EXTRAS ?= demo,log,test,bench,hub,export,wandb,mlflow
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-quick bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --quiet --no-deps "torchattacks>=3.5"  # extra 'attacks': its torchvision pin would replace the CPU torch
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lipnext demo

# everything CI can run; prints each test of the slow and distributed groups and the 15 slowest
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not distributed" --durations=15
	$(BIN)/python -m pytest -m "slow or distributed" -v --durations=15

# for development: the quick tests only (no slow, no torchrun tests)
test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not distributed" --durations=10

bench: $(STAMP)
	$(BIN)/lipnext bench step

clean:
	rm -rf $(VENV) runs .pytest_cache
