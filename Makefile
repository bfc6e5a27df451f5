# `make demo` and `make test` set up the environment when needed, then run.
# Setup creates .venv in the repo unless a virtual environment is already active,
# and reinstalls only when pyproject.toml changed.
SHELL := /bin/bash
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mumic-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: setup demo lint test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@rm -f $(VENV)/.mumic-* && touch $@

demo: setup
	$(VENV)/bin/mumic demo

# ruff over the code, tests and benchmarks, then mypy over src/ (settings: pyproject.toml).
# Both keep caches under .cache/, so a second run with nothing changed takes about a second.
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

test: setup lint
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf .venv runs/demo data/shapes
