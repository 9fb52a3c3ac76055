# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Each stamp records the requirements it was built from, so an edit re-installs and a re-run does not.
STAMP_RUN := $(VENV)/.stamp-run
STAMP_TEST := $(VENV)/.stamp-test

.PHONY: venv venv-test test test-all demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip==26.3

# torch (test reference only) goes in before anything that might depend on it, so pip takes the
# CPU build from local disk instead of fetching a CUDA build.
$(STAMP_TEST): requirements-test.txt | $(PY)
	$(PIP) install -q -r requirements-test.txt
	touch $@

$(STAMP_RUN): requirements.txt pyproject.toml | $(PY)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $@

venv: $(STAMP_RUN)

venv-test: $(STAMP_TEST) $(STAMP_RUN)

test: venv-test
	$(PY) -m pytest -q tests

# Includes the slow tests (real SmolLM2 weights); CI runs this target.
test-all: venv-test
	$(PY) -m pytest -q --runslow tests

demo: venv
	$(PY) -m cloud_jax demo

clean:
	rm -rf $(VENV)
