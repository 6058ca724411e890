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
	KERAS_BACKEND=jax REGRAFT_TF_FILES=$(abspath $(TF_FILES)) $(JAX_BIN)/python -m pytest -rs $(JAX_TESTS) \
		$(foreach t,$(JAX_DESELECT),--deselect $(t))

# Test files importing TensorFlow at module level (test_load, test_sources, test_cli, test_zoo) run
# on the TF stage only; in these, tests whose own code writes with TensorFlow are skipped (conftest).
JAX_TESTS := tests/test_backends.py tests/test_align.py tests/test_structure.py tests/test_registry.py \
	tests/test_naming.py tests/test_targets.py tests/test_verify.py tests/test_plan.py tests/test_planfile.py \
	tests/test_transforms.py tests/test_growth.py tests/test_bundle.py tests/test_compat.py \
	tests/test_apply_faults.py tests/test_building.py tests/test_hardening_h5.py tests/test_progress.py \
	tests/test_writers.py tests/test_convert.py tests/test_torch_layout.py tests/test_optimizer_state.py
# The test_verify ones write a TF checkpoint through regraft, which needs the TensorFlow backend by
# design; the test_apply_faults one writes its checkpoint with TensorFlow in a child process; the
# test_compat one pins TensorFlow's own `_trackable_children` (elsewhere regraft predicts the children).
JAX_DESELECT := tests/test_compat.py::test_an_object_that_is_not_trackable_is_a_loud_error \
	tests/test_apply_faults.py::test_random_ctrl_c_during_loads_in_a_child_process \
	tests/test_verify.py::test_verify_command_passes_with_exit_0_and_json \
	tests/test_verify.py::test_verify_command_exceeding_the_tolerance_exits_1 \
	tests/test_verify.py::test_verify_command_user_errors_raise_for_exit_2

bench: $(BIN)/regraft
	$(BIN)/python bench/bench_load.py

clean:
	rm -rf $(VENV) $(JAX_VENV) build src/*.egg-info
