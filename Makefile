# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install dlr into it first (torch pinned: an unpinned torch pulls
# multi-GB CUDA wheels on CPU machines; set TORCH_SPEC to change it).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dlr-installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled

.PHONY: install demo test test-fast bench docs-tables clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(BIN)/python scripts/demo.py

test: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q -m "not slow"

# A quick CPU run of the step benchmark; benchmarks/README.md lists the full ones.
bench: $(STAMP)
	$(OFFLINE) $(BIN)/python -m benchmarks.bench_train --device cpu --sizes llama_tiny --micro-batch 2 --repeats 3 --warmup 1

docs-tables: $(STAMP)
	$(BIN)/python scripts/model_table.py

clean:
	rm -rf runs multirun build *.egg-info
