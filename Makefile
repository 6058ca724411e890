# `make demo` and `make test` each create the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test bench clean

$(BIN)/regraft: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/regraft
	$(BIN)/regraft demo

test: $(BIN)/regraft
	$(BIN)/python -m pytest

bench: $(BIN)/regraft
	$(BIN)/python bench/bench_load.py

clean:
	rm -rf $(VENV) build src/*.egg-info
