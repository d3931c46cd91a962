# The two commands: `make demo` (set up, then the whole paper at demo scale on generated data:
# cnnft-reproduce) and `make test` (set up, then run the test suite). Both start from nothing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench

$(BIN)/cnnft-train: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the release that lies on this machine's disk (no resolver surprises)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/cnnft-train

demo: setup
	$(BIN)/cnnft-reproduce

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check cnnft analyses tests bench

bench: setup
	$(BIN)/python bench/train_throughput.py
