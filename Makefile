# Set-up and the two everyday commands. `make demo` and `make test` each create the
# virtual environment on first use: torch is installed first, pinned to the CPU build
# (an unpinned torch would pull several GB of CUDA packages), then masklab itself.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
# Real data: the shared folder beside the checkout unless MASKLAB_DATA_DIR says otherwise.
export MASKLAB_DATA_DIR ?= $(abspath ../shared/data)
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev,bench,video]"
	touch $@

demo: setup  ## the main job: a real study on WikiText-2 into ./masklab-runs
	$(BIN)/masklab run gpt_pbw_demo

test: setup  ## the test suite (what CI runs)
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check lit_modules studies dashboards reports tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_gpt.py

clean:
	rm -rf $(VENV) masklab-runs
