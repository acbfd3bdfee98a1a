# Each target sets itself up on a fresh machine: a virtual environment with the CPU build of torch pinned first
# (an unpinned torch pulls a multi-GB CUDA build), then the package.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup test test-slow test-all lint demo generate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,demo,eval]"
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests examples scripts benchmarks

# The fast layer (units and small integrations, about 2 minutes on 2 cores): what to run before every commit.
test: lint
	$(BIN)/python -m pytest -q -m "not slow"

# The slow layer: the script, app, benchmark and real-evaluator tests (@pytest.mark.slow).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Both layers, fast first (what CI runs).
test-all: test test-slow

demo: $(STAMP)
	$(BIN)/python examples/demo.py --output_dir outputs/demo

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
