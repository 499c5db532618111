# Freeski bot: `make demo` runs the whole pipeline offline, `make test` runs the tests.
# Both install into .venv first when it is missing or older than pyproject.toml or the lock.
# Every package comes at the version requirements.lock names (`make lock` refreshes it).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# Where there is no NVIDIA GPU, this torch release is installed first, as a CPU build.
# Set TORCH_INDEX_URL to PyTorch's CPU wheel index if your pip would otherwise pick a CUDA build.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
PIP := $(BIN)/python -m pip
PIP_FLAGS ?= --quiet --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install lock test lint format demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "install: NVIDIA GPU found, installing torch $(TORCH_VERSION) with its CUDA build"; \
		$(PIP) install $(PIP_FLAGS) "torch==$(TORCH_VERSION)"; \
	else \
		echo "install: no NVIDIA GPU, installing the CPU build of torch $(TORCH_VERSION)"; \
		$(PIP) install $(PIP_FLAGS) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "torch==$(TORCH_VERSION)"; \
	fi
	@echo "install: the locked dependencies ($(LOCK)) and the project into $(VENV)"
	@$(PIP) install $(PIP_FLAGS) --no-deps -r $(LOCK)
	@PYTHONWARNINGS=ignore $(PIP) install $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	@touch $@

# Refresh the lock to the newest releases pyproject.toml allows (torch stays at TORCH_VERSION,
# installed on its own above because its build differs between CPU and GPU machines).
lock: $(STAMP)
	@printf 'torch==%s\n' "$(TORCH_VERSION)" > $(VENV)/torch-constraint.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --upgrade --quiet --extra dev --strip-extras \
		--no-emit-index-url --no-emit-find-links --unsafe-package torch \
		--constraint $(VENV)/torch-constraint.txt \
		--output-file $(LOCK) pyproject.toml
	@echo "lock: $(LOCK) refreshed; run make test, then commit it"

test: $(STAMP)
	$(BIN)/python -m pytest

# mypy type-checks, strictly, the packages pyproject.toml's [tool.mypy] names.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: $(STAMP)
	$(BIN)/python -m bot.demo

bench: $(STAMP)
	$(BIN)/python benchmarks/worker_throughput.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache .mypy_cache
