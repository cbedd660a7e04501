# The course's two jobs. Each installs what is missing into .venv first.
#   make book   executes every chapter (llmbook book) into build/
#   make test   runs the tests, which execute every notebook in QUICK mode (nbgrader's autograde)
PYTHON ?= python3
TORCH ?= torch==2.13.0
# On Linux, PyPI's torch is a multi-GB CUDA build; a CPU-only machine can take the small one with
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
NPROC := $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)
export OMP_NUM_THREADS ?= $(NPROC)

.PHONY: install book test doctor lab

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

book: install  # no MPLBACKEND here: the kernels' inline backend puts the figures in the notebooks
	$(BIN)/llmbook book --out build

test: install
	LLMBOOK_QUICK=1 MPLBACKEND=Agg $(BIN)/python -m pytest

doctor: install
	$(BIN)/llmbook doctor

lab: install
	$(BIN)/jupyter lab chapters/
