# Everything installs into local virtual environments; nothing touches the system Python.
# torch is pinned to the CPU build (a bare `torch` would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
LITGPT_VENV ?= .venv-litgpt
TORCH ?= torch==2.13.0
TRANSFORMERS ?= transformers==5.23.0
LITGPT ?= litgpt==0.5.13
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) $(TORCH)
	$(VENV)/bin/pip install $(PIP_FLAGS) -e ".[test]" $(TRANSFORMERS)
	touch $@

# LitGPT 0.5.x needs huggingface_hub<1.4 and transformers 5 needs newer: LitGPT gets its own
# venv, and the tests drive it as a subprocess (tests/peers/litgpt_peer.py).
$(LITGPT_VENV)/.installed:
	$(PYTHON) -m venv $(LITGPT_VENV)
	$(LITGPT_VENV)/bin/pip install $(PIP_FLAGS) $(TORCH)
	$(LITGPT_VENV)/bin/pip install $(PIP_FLAGS) $(LITGPT)
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python examples/demo.py demo-out

test: $(VENV)/.installed $(LITGPT_VENV)/.installed
	$(VENV)/bin/python -m pytest -q

bench: $(VENV)/.installed $(LITGPT_VENV)/.installed
	$(VENV)/bin/python bench/bench_convert.py

clean:
	rm -rf demo-out .pytest_cache
