# Two commands do all set-up on a fresh clone:  make demo   and   make test
# Both create .venv, install torch==2.13.0 (the CPU build) first, then the project with the CPU extras.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
EXTRAS ?= cpu,train,export,bench,dev,serve
PYTEST_ARGS ?=

.PHONY: install test demo lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/flare-demo $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check runtime train export benchmarks tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
