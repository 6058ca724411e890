# `make demo` and `make test` each create the virtual environment on first use;
# `make test-jax` creates a second one with the JAX backend and no TensorFlow.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
JAX_VENV ?= .venv-jax
JAX_BIN  := $(JAX_VENV)/bin
TF_FILES ?= build/tf-files

export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-jax bench clean

$(BIN)/regraft: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(JAX_BIN)/regraft: pyproject.toml
	$(PYTHON) -m venv $(JAX_VENV)
	$(JAX_BIN)/pip install --quiet --upgrade pip
	$(JAX_BIN)/pip install --quiet -e '.[jax,test]'
	@if $(JAX_BIN)/python -c 'import tensorflow' 2>/dev/null; then \
		echo "$(JAX_VENV) has TensorFlow: the JAX stage must run without it" >&2; exit 1; fi
	touch $@

demo: $(BIN)/regraft
	$(BIN)/regraft demo

test: $(BIN)/regraft
	$(BIN)/python -m pytest

# The TF environment writes the checkpoints (TensorFlow's own writer); the JAX
# environment, which has no TensorFlow, loads them and runs the TensorFlow-free tests.
test-jax: $(BIN)/regraft $(JAX_BIN)/regraft
	rm -rf $(TF_FILES)
	KERAS_BACKEND=tensorflow $(BIN)/python tests/backend_cases.py $(TF_FILES)
	KERAS_BACKEND=jax REGRAFT_TF_FILES=$(abspath $(TF_FILES)) $(JAX_BIN)/python -m pytest -rs \
		tests/test_backends.py tests/test_align.py tests/test_structure.py tests/test_registry.py

bench: $(BIN)/regraft
	$(BIN)/python bench/bench_load.py

clean:
	rm -rf $(VENV) $(JAX_VENV) build src/*.egg-info
