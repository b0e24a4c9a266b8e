# Two commands for a fresh machine (see README):
#   make demo   set everything up, then edit the built-in sample clip (random tiny model unless MODEL=...)
#   make test   set everything up, then run the test suite (CPU; GPU tests skip without CUDA)
# Both create or reuse the venv $(VENV). Torch 2.13.0 (CPU) is installed only when the venv has no
# torch: to use a CUDA torch, create the venv with it first (python -m venv .venv && .venv/bin/pip
# install torch) and `make` reuses it. numpy is installed before the C++ extension is built (torch's
# build helpers import it); `demo` installs the package only, `test` adds pytest and Triton.

VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out/demo
MODEL ?=
STAMP := $(VENV)/.fatezero-fast-installed
TEST_STAMP := $(VENV)/.fatezero-fast-test-installed

.PHONY: setup setup-test demo test clean

setup: $(STAMP)

setup-test: $(TEST_STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q setuptools wheel ninja numpy
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q pytest "triton>=3.0"
	touch $(TEST_STAMP)

demo: setup
	$(VENV)/bin/fatezero-fast edit --output $(OUT) --overwrite $(if $(MODEL),--model $(MODEL))

test: setup-test
	$(PY) -m pytest -q tests

clean:
	rm -rf build *.egg-info fatezero_fast/_C*.so out
