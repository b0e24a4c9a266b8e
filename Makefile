# Two commands for a fresh machine (see README):
#   make demo   set everything up, then edit the built-in sample clip (random tiny model unless MODEL=...)
#   make test   set everything up, then run the test suite (CPU; GPU tests skip without CUDA)
# Both create or reuse the venv $(VENV). Torch 2.13.0 (CPU) is installed only when the venv has no
# torch: to use a CUDA torch, create the venv with it first (python -m venv .venv && .venv/bin/pip
# install torch) and `make` reuses it.

VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out/demo
MODEL ?=
STAMP := $(VENV)/.fatezero-fast-installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q setuptools wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,triton]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/fatezero-fast edit --output $(OUT) --overwrite $(if $(MODEL),--model $(MODEL))

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf build *.egg-info fatezero_fast/_C*.so out
