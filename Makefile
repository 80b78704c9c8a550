# Two entry points: `make demo` and `make test`. Both create .venv and install dinoseg into it first.
# `make test-oldest` (not in CI) proves the lower bounds of pyproject.toml: it installs exactly those versions into
# .venv-oldest and runs the config, command-line and parity tests there.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

OLDEST := .venv-oldest
# "pkg>=x" of pyproject.toml's dependencies and dev extra (but ruff, which the tests do not run) -> "pkg==x".
MINIMA = $(shell sed -n '/^dependencies = \[/,/^\]/p' pyproject.toml | grep -o '"[^"]*>=[^"]*"' | tr -d '"' | sed 's/>=/==/')
TEST_MINIMA = $(shell sed -n '/^dev = \[/,/^\]/p' pyproject.toml | grep -o '"[^"]*>=[^"]*"' | grep -v ruff | tr -d '"' | sed 's/>=/==/')
# A dependency of a dependency that pip's resolver does not backtrack to by itself (matplotlib 3.6 with numpy 1.23).
OLDEST_HINTS = 'contourpy<1.3'
PINNED = $(foreach r,$(MINIMA) $(TEST_MINIMA),$(firstword $(subst ==, ,$(r))))
SPACE := $(subst ,, )
OLDEST_TESTS := tests/test_config.py tests/test_config_effects.py tests/test_official_configs.py tests/test_check_data.py \
	tests/test_train.py tests/test_backbone.py tests/test_convnext.py tests/test_linear_head.py tests/test_m2f.py \
	tests/test_ms_deform_attn.py tests/test_metrics.py tests/test_inference.py tests/test_official_call_forms.py \
	tests/test_official_protocol.py tests/test_schedulers.py tests/test_transforms.py tests/test_hf_checkpoint.py

.PHONY: demo test test-oldest lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dinoseg demo

# One test worker per core (tests/conftest.py gives each one thread), test files kept together in one worker.
test: $(STAMP)
	$(BIN)/ruff check dinoseg tests benchmarks hubconf.py
	$(BIN)/python -m pytest -q -n auto --dist loadfile

test-oldest:
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install $(MINIMA) $(TEST_MINIMA) $(OLDEST_HINTS)
	$(OLDEST)/bin/python -m pip freeze | grep -i -E '^($(subst $(SPACE),|,$(PINNED)))=='
	OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR) $(OLDEST)/bin/python -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check dinoseg tests benchmarks hubconf.py

clean:
	rm -rf $(VENV) $(OLDEST) runs
