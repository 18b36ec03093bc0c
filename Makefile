# Lil Gatsby. `make run` trains the reference experiment; `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXP    ?= experiments/lil_gatsby.yaml
RUNS   ?= runs

.PHONY: setup run test sweep index bench clean

# The venv is rebuilt when pyproject.toml changes. torch==2.13.0 is the CPU build on this project's
# machines; for CUDA, install a CUDA build of torch 2.13.0 into .venv first (see README).
$(BIN)/lilgatsby: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/lilgatsby

run: setup
	$(BIN)/lilgatsby train $(EXP) --runs $(RUNS)

test: setup
	$(BIN)/python -m pytest

sweep: setup
	$(BIN)/lilgatsby sweep $(EXP) --runs $(RUNS)

index: setup
	$(BIN)/lilgatsby index $(RUNS)

# BENCH_ARGS: e.g. --steps 10000 (full reference run) or --sweep (8-seed sweep)
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
