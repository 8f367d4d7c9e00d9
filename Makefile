# The two commands of the quick start: `make demo` and `make test`.
# The virtual environment lives in .venv and is rebuilt only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: venv system-deps demo test test-fast lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

venv: $(STAMP)

# Debian packages: Fashion-MNIST's IDX files and Chromium for the report-page test.
# Best effort: without root or apt the tests that need them skip and say why.
system-deps:
	@bash scripts/system-deps.sh

demo: venv
	@bash scripts/system-deps.sh demo
	$(PY) -m training demo --host $(HOST) --port $(PORT)

test: venv system-deps
	bash scripts/test.sh

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

lint: venv
	bash scripts/lint.sh

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: venv
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
