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
	touch $@ $(BIN)/.demo-ready

# What the demo needs: the core and the plot extra (not torch, Ray or the browser tests).
$(BIN)/.demo-ready: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[plot]"
	touch $@

# The main job: the paper's toy problem as a persistent run in ./poptune.db (SQLite), then
# PBT against explore-only, exploit-only and grid search over 100 seeds, with a plot.
demo: $(BIN)/.demo-ready
	$(BIN)/poptune run examples/toy_quadratic.py --storage sqlite:///poptune.db
	$(BIN)/python examples/toy_quadratic.py --seeds 100 --plot toy_quadratic.png
	@echo "The poptune command is in $(BIN): run '. $(BIN)/activate' first, or call $(BIN)/poptune."

test: $(BIN)/.ready lint
	$(BIN)/python -m pytest -q

lint: $(BIN)/.ready
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks
	$(BIN)/mypy

bench: $(BIN)/.ready
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/persistence.py
	$(BIN)/python benchmarks/convergence.py
	$(BIN)/python benchmarks/domains.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
