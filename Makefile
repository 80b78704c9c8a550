# Two entry points: `make demo` and `make test`. Both create .venv and install dinoseg into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dinoseg demo

test: $(STAMP)
	$(BIN)/ruff check dinoseg tests benchmarks hubconf.py
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check dinoseg tests benchmarks hubconf.py

clean:
	rm -rf $(VENV) runs
