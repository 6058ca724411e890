# `make demo` and `make test` each create the virtual environment on first use;
# `make test-jax` creates a second one with the JAX backend and no TensorFlow,
# `make test-torch` a third with the PyTorch backend (CPU build) and no TensorFlow.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
JAX_VENV ?= .venv-jax
JAX_BIN  := $(JAX_VENV)/bin
TORCH_VENV ?= .venv-torch
TORCH_BIN  := $(TORCH_VENV)/bin
# The CPU build of PyTorch. Never the plain `torch` wheel: on Linux that is a CUDA build of
# several GB. pip finds the CPU wheel through its find-links (CI: /opt/wheels) or an index
# such as https://download.pytorch.org/whl/cpu (PIP_EXTRA_INDEX_URL).
TORCH_PIN ?= torch==2.13.0+cpu
TF_FILES ?= build/tf-files

export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-jax test-torch bench clean

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

$(TORCH_BIN)/regraft: pyproject.toml
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_BIN)/pip install --quiet --upgrade pip
	@$(TORCH_BIN)/pip install --quiet -e '.[test]' 'keras>=3.15.1,<4' '$(TORCH_PIN)' || { \
		echo "Could not install $(TORCH_PIN), the CPU build of PyTorch, into $(TORCH_VENV): give pip a find-links" \
			"folder holding its wheel or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu." \
			"The default torch wheel is not used: it is a CUDA build of several GB." >&2; exit 1; }
	@if $(TORCH_BIN)/python -c 'import tensorflow' 2>/dev/null; then \
		echo "$(TORCH_VENV) has TensorFlow: the PyTorch stage must run without it" >&2; exit 1; fi
	touch $@

demo: $(BIN)/regraft
	$(BIN)/regraft demo

test: $(BIN)/regraft
	$(BIN)/python -m pytest

# The TF environment writes the checkpoints (TensorFlow's own writer): tests/backend_cases.py's
# cases and every file a test declares with @tf_writer. The JAX and PyTorch environments, which
# have no TensorFlow, load them and run the tests below; both stages share the files. The JAX
# stage runs on 8 virtual CPU devices (the flag must be set before JAX starts) for tests/test_sharded.py.
$(TF_FILES)/.written: $(BIN)/regraft $(shell find src tests bench -name '*.py')
	rm -rf $(TF_FILES)
	KERAS_BACKEND=tensorflow $(BIN)/python tests/backend_cases.py $(TF_FILES)
	touch $@

test-jax: $(JAX_BIN)/regraft $(TF_FILES)/.written
	XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax REGRAFT_TF_FILES=$(abspath $(TF_FILES)) $(JAX_BIN)/python -m pytest -rs $(JAX_TESTS) \
		$(foreach t,$(JAX_DESELECT),--deselect $(t))

test-torch: $(TORCH_BIN)/regraft $(TF_FILES)/.written
	KERAS_BACKEND=torch REGRAFT_TF_FILES=$(abspath $(TF_FILES)) $(TORCH_BIN)/python -m pytest -rs $(TORCH_TESTS) \
		$(foreach t,$(TORCH_DESELECT),--deselect $(t))

# The matching and load tests (test_load, test_sources, test_cli, test_formats, test_zoo) read what
# TensorFlow wrote from TF_FILES; a test that needs TensorFlow at run time (its own reader as the
# reference, writing a TF checkpoint or SavedModel, tf_keras) is skipped and says why (-rs).
# Not here: test_hardening_tf, test_hardening_out, test_fuzz (TF stage only).
JAX_TESTS := tests/test_backends.py tests/test_align.py tests/test_structure.py tests/test_registry.py \
	tests/test_naming.py tests/test_targets.py tests/test_verify.py tests/test_plan.py tests/test_planfile.py \
	tests/test_transforms.py tests/test_growth.py tests/test_bundle.py tests/test_compat.py \
	tests/test_apply_faults.py tests/test_building.py tests/test_hardening_h5.py tests/test_progress.py \
	tests/test_writers.py tests/test_convert.py tests/test_torch_layout.py \
	tests/test_load.py tests/test_sources.py tests/test_cli.py tests/test_formats.py tests/test_zoo.py \
	tests/test_sharded.py tests/test_optimizer_state.py tests/test_hdf5_reader.py
# The test_verify ones write a TF checkpoint through regraft, which needs the TensorFlow backend by
# design; the test_apply_faults one writes its checkpoint with TensorFlow in a child process; the
# test_compat one pins TensorFlow's own `_trackable_children` (elsewhere regraft predicts the children).
JAX_DESELECT := tests/test_compat.py::test_an_object_that_is_not_trackable_is_a_loud_error \
	tests/test_apply_faults.py::test_random_ctrl_c_during_loads_in_a_child_process \
	tests/test_verify.py::test_verify_command_passes_with_exit_0_and_json \
	tests/test_verify.py::test_verify_command_exceeding_the_tolerance_exits_1 \
	tests/test_verify.py::test_verify_command_user_errors_raise_for_exit_2
# PyTorch: the same files and deselections.
TORCH_TESTS := $(JAX_TESTS)
TORCH_DESELECT := $(JAX_DESELECT)

bench: $(BIN)/regraft
	$(BIN)/python bench/bench_load.py

clean:
	rm -rf $(VENV) $(JAX_VENV) $(TORCH_VENV) build src/*.egg-info
