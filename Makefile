# lipnext — set-up, demo and tests on a fresh machine (Python >= 3.10).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; override TORCH for another build (e.g. TORCH='torch>=2.3').
TORCH  ?= torch==2.13.0
EXTRAS ?= demo,log,test,bench
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

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

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
