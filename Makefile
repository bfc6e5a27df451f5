# `make demo` and `make test` set up the environment when needed, then run.
# Setup creates .venv in the repo unless a virtual environment is already active,
# and reinstalls only when pyproject.toml changed.
SHELL := /bin/bash
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mumic-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: setup browser demo lint test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@rm -f $(VENV)/.mumic-* && touch $@

# The page's browser test (tests/test_page_browser.py) drives Debian's Chromium through
# chromium-driver: installed here when missing, if run as root with apt-get; elsewhere the
# test skips and says what is missing (under CI=true it fails instead).
BROWSER_PKGS := chromium chromium-driver

browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $(BROWSER_PKGS) for the page's browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq $(BROWSER_PKGS) >/dev/null \
	    || { apt-get update -qq && apt-get install -y -qq $(BROWSER_PKGS) >/dev/null; } \
	    || echo "could not install $(BROWSER_PKGS): the browser test will skip"; \
	else echo "no chromium and chromedriver (Debian's $(BROWSER_PKGS), installed as root): the browser test will skip"; fi

demo: setup
	$(VENV)/bin/mumic demo

# ruff over the code, tests and benchmarks, then mypy over src/ (settings: pyproject.toml).
# Both keep caches under .cache/, so a second run with nothing changed takes about a second.
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

test: setup browser lint
	$(PY) -m pytest -q

test-fast: setup browser
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf .venv runs/demo data/shapes
