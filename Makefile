# Two entry points: `make demo` (set up, then run the built-in demo) and `make test` (set up, then run the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(BIN)/sdvae demo

test: $(STAMP)
	$(BIN)/python -m pytest
