# Freeski bot: `make demo` runs the whole pipeline offline, `make test` runs the tests.
# Both install into .venv first when it is missing or older than pyproject.toml.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where there is no NVIDIA GPU, this torch release is installed first, as a CPU build.
# Set TORCH_INDEX_URL to PyTorch's CPU wheel index if your pip would otherwise pick a CUDA build.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
PIP := $(BIN)/python -m pip
PIP_FLAGS ?= --quiet --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test lint format demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "install: NVIDIA GPU found, torch comes with its CUDA build"; \
	else \
		echo "install: no NVIDIA GPU, installing the CPU build of torch $(TORCH_VERSION)"; \
		$(PIP) install $(PIP_FLAGS) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "torch==$(TORCH_VERSION)"; \
	fi
	@echo "install: the project and its dev tools into $(VENV)"
	@$(PIP) install $(PIP_FLAGS) -e ".[dev]"
	@touch $@

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: $(STAMP)
	$(BIN)/python -m bot.demo

bench: $(STAMP)
	$(BIN)/python benchmarks/worker_throughput.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache
