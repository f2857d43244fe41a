# Two commands do all set-up on a fresh clone:  make demo   and   make test
# Both create .venv, install torch==2.13.0 (the CPU build) first, then the project with the CPU extras.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
# -qq: pip's errors only (its warnings, e.g. about configured index locations that do not exist, flooded make demo)
PIP    := $(PY) -m pip --disable-pip-version-check -qq
EXTRAS ?= cpu,openvino,train,export,bench,preview,dicom,dev,serve
TORCH_VERSION   ?= 2.13.0
# PyTorch's CPU-only wheels; the default index (PyPI) serves the CUDA build of torch on Linux
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: install test demo proof lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	@# The CPU build of torch: from PyTorch's CPU index when it answers within 5 s, else from pip's own sources
	@# (a local wheel or index here); short network timeouts so that an unreachable host cannot hang CI.
	@if $(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" 2>/dev/null; then \
		echo "make: installing torch==$(TORCH_VERSION) from the PyTorch CPU index $(TORCH_CPU_INDEX)"; \
		$(PIP) install --timeout 30 --retries 2 torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX); \
	else \
		echo "make: $(TORCH_CPU_INDEX) unreachable; installing torch==$(TORCH_VERSION) from pip's configured sources"; \
		$(PIP) install --timeout 30 --retries 2 torch==$(TORCH_VERSION); \
	fi
	@$(PY) -W ignore -c "import torch; cuda = torch.version.cuda; \
	print(f'make: installed torch {torch.__version__}: ' + (f'CUDA {cuda} build (not the CPU build: the CPU index was unreachable)' if cuda else 'CPU build'))"
	$(PIP) install -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/flare-demo $(DEMO_ARGS)

# the proof that the recipe learns (docs/training.md): 28-40 min on 2 idle cores, by host (measured 2026-12-05); results in proof-out/proof.md
proof: install
	nice $(VENV)/bin/flare-demo --proof --out proof-out $(PROOF_ARGS)

lint: install
	$(VENV)/bin/ruff check runtime train export benchmarks tests
	$(VENV)/bin/mypy runtime train export benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
