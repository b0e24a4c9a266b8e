# Two commands for a fresh machine (see README):
#   make demo   set everything up, then three edits of the toy-world clip with the trained toy model
#               (MODEL=DIR: your Stable Diffusion folder through the CLI; RANDOM=1: the random tiny model)
#   make test   set everything up, then run the test suite (CPU; GPU tests skip without CUDA)
# Both create or reuse the venv $(VENV). Torch 2.13.0 (CPU) is installed only when the venv has no
# torch: to use a CUDA torch, create the venv with it first (python -m venv .venv && .venv/bin/pip
# install torch) and `make` reuses it. numpy is installed before the C++ extension is built (torch's
# build helpers import it); `demo` installs the package only, `test` adds pytest and Triton.

VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out/demo
MODEL ?=
RANDOM ?=
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
ifneq ($(MODEL)$(RANDOM),)
	$(VENV)/bin/fatezero-fast edit --output $(OUT) --overwrite $(if $(MODEL),--model $(MODEL))
else
	$(PY) -m fatezero_fast.toyworld.demo --output $(OUT)
endif

test: setup-test
	$(PY) -m pytest -q tests

clean:
	rm -rf build *.egg-info fatezero_fast/_C*.so out
