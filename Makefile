# Two commands on a fresh machine:  `make demo`  and  `make test`.
#
# Environment: an active virtualenv/conda env is used as it is (your own torch is kept);
# otherwise ./.venv is created (it sees the base interpreter's packages, so a torch
# installed there is kept too). Only where no torch imports is torch==2.13.0 installed.
# The pin picks a version, not the hardware: from PyPI on Linux x86_64 it is the CUDA
# build (several GB); install the torch you want first and it is kept.
SHELL := /bin/bash
PYTHON_BASE ?= python3
ACTIVE_ENV := $(or $(VIRTUAL_ENV),$(CONDA_PREFIX))
ifeq ($(ACTIVE_ENV),)
  PY := .venv/bin/python
else
  PY := $(ACTIVE_ENV)/bin/python
endif
# One stamp per environment and clone, kept inside the environment: switching between an
# active env and ./.venv (or deleting .venv) installs again.
ENV_DIR := $(or $(ACTIVE_ENV),.venv)
STAMP := $(ENV_DIR)/.h3-installed$(subst /,_,$(CURDIR))

.PHONY: demo test lint bench env clean browser screenshot

env: $(STAMP)

$(STAMP): pyproject.toml
	@if [ -z "$(ACTIVE_ENV)" ] && [ ! -x .venv/bin/python ]; then \
	  echo "creating .venv"; $(PYTHON_BASE) -m venv --system-site-packages .venv; fi
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  echo "no torch importable: installing torch==2.13.0 from your package index"; \
	  echo "(on a stock Linux x86_64 machine that is the CUDA build, several GB; to choose, install torch first)"; \
	  $(PY) -m pip install -q "torch==2.13.0"; fi
	$(PY) -m pip install -q -e ".[optim,dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m h3d demo

# The dashboard's tests drive Debian's chromium through Playwright (no browser download).
# As root (CI) it is installed when missing; otherwise those tests skip and say why.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium for the dashboard tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "chromium could not be installed: the browser tests will skip"; fi

# pytest runs on one worker per core (pytest-xdist), at most 4: each worker imports torch
# and starts its own daemons. `pytest` alone runs serially.
test: $(STAMP) browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest -n auto --maxprocesses 4

# The README's figure, docs/img/dashboard.png: the run page of a real `h3d demo` run on a
# fresh data dir, taken in chromium (the daemon it starts is stopped afterwards).
screenshot: $(STAMP) browser
	$(PY) docs/img/capture.py

bench: $(STAMP)
	$(PY) benchmarks/ingest.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache .mypy_cache
