# `make demo` and `make test` each create and fill .venv themselves (Python >= 3.10 needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned so pip never resolves a newer (CUDA, multi-GB) build; it is only used by the
# tests of the torch checkpoint path and the [torch] extra.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/.ready: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

demo: $(BIN)/.ready
	$(BIN)/python examples/toy_quadratic.py --seeds 100 --plot toy_quadratic.png

test: $(BIN)/.ready
	$(BIN)/python -m pytest -q

lint: $(BIN)/.ready
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks
	$(BIN)/mypy

bench: $(BIN)/.ready
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
