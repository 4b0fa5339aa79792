# Two commands for a new user: `make run` (default job) and `make test` (the suite).
# Both create .venv if it is missing. The CPU path pins torch==2.13.0 (a CPU build; an unpinned
# torch would pull a multi-GB CUDA build). A GPU cluster installs its own torch, then `pip install -e .`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-experiments test-fast test-unit test-integration test-distributed lint format typecheck install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	# torch pinned again so that no dependency's requirement can upgrade it to a CUDA build
	$(PY) -m pip install -q -e ".[dev]" torch==2.13.0
	# litdata declares torchvision (for image data, which llamalab never streams). PyPI's wheel is
	# a CUDA build: next to the CPU torch its ops fail to register and break `import torchmetrics`
	# (hence Lightning). The CPU path removes it; a GPU cluster keeps its matching build.
	$(PY) -m pip uninstall -q -y torchvision
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) src/train.py

test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -m "not experiment"

# The experiments end to end in their --quick form (README, "Tests"): kept out of `make test`,
# whose 30-minute budget on 2 cores they would break.
test-experiments: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -m experiment

test-fast: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -m "not slow"

# The split of the suite by markers (README, "Tests").
test-unit: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -m "not integration and not distributed"

test-integration: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -m "integration and not distributed"

test-distributed: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -m distributed

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
