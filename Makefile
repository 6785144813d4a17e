# Everything installs into local virtual environments; nothing touches the system Python.
# torch is pinned to the CPU build (a bare `torch` would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
LITGPT_VENV ?= .venv-litgpt
LLAVA_VENV ?= .venv-llava
DEEPSPEED_VENV ?= .venv-deepspeed
OPTIMUM_VENV ?= .venv-optimum
TORCH ?= torch==2.13.0
TRANSFORMERS ?= transformers==5.23.0
PEFT ?= peft==0.21.2
ONNX ?= onnx==1.23.2 onnxruntime==1.32.0
# optimum-onnx 0.1 needs transformers < 4.58: its own venv, for the ONNX benchmark only
OPTIMUM ?= optimum-onnx[onnxruntime]==0.1.0 transformers==4.57.6
LITGPT ?= litgpt==0.5.13
MINDSPORE ?= mindspore==2.10.0
MINDFORMERS ?= mindformers==2.0.0
NANOTRON ?= nanotron==0.4
DACITE ?= dacite==1.9.2
LLAVA ?= llava-torch==1.2.2.post1
DEEPSPEED ?= deepspeed==0.19.8
# what llava-torch 1.2.2.post1 pins (transformers 4.37.2 and its tokenizers/accelerate), minus
# what CPU inference does not import (gradio, bitsandbytes, deepspeed, its torch 2.0.1)
LLAVA_DEPS ?= transformers==4.37.2 tokenizers==0.15.1 accelerate==0.21.0 sentencepiece protobuf pillow "numpy<2" safetensors einops
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: demo test bench fuzz clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) $(TORCH)
	$(VENV)/bin/pip install $(PIP_FLAGS) -e ".[test]" $(TRANSFORMERS) $(PEFT) $(ONNX)
	touch $@

# LitGPT 0.5.x needs huggingface_hub<1.4 and transformers 5 needs newer: LitGPT gets its own
# venv, and the tests drive it as a subprocess (tests/peers/litgpt_peer.py).
$(LITGPT_VENV)/.installed:
	$(PYTHON) -m venv $(LITGPT_VENV)
	$(LITGPT_VENV)/bin/pip install $(PIP_FLAGS) $(TORCH)
	$(LITGPT_VENV)/bin/pip install $(PIP_FLAGS) $(LITGPT)
	touch $@

# MindSpore (CPU, ~800 MB) installs into the test venv without changing torch, transformers or
# numpy; only the tests need it (they drive it as a subprocess, tests/peers/mindspore_peer.py,
# because importing it changes the process for later tests).
$(VENV)/.installed-mindspore: $(VENV)/.installed
	$(VENV)/bin/pip install $(PIP_FLAGS) $(MINDSPORE)
	# MindFormers' own converter is a test peer only; its pins (numpy<2, transformers 4.57) are not
	# needed by the two files the peer loads, so it goes in without dependencies
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps $(MINDFORMERS)
	touch $@

# Nanotron 0.4 (the only Nanotron on PyPI) is a test peer only (tests/peers/nanotron_peer.py runs its
# own save_weights/load_weights on CPU). It goes in without dependencies so nothing in the test venv
# moves; of what it needs only dacite is new, the rest (torch, pyyaml, numpy, packaging,
# safetensors, tqdm) is named so a change elsewhere cannot drop it.
$(VENV)/.installed-nanotron: $(VENV)/.installed
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps $(NANOTRON)
	$(VENV)/bin/pip install $(PIP_FLAGS) $(DACITE) pyyaml numpy packaging safetensors tqdm
	touch $@

# The official LLaVA codebase pins transformers 4.37: its own venv, driven as a subprocess
# (tests/peers/llava_peer.py). llava-torch goes in without its dependencies (torch 2.0.1, gradio, ...).
$(LLAVA_VENV)/.installed:
	$(PYTHON) -m venv $(LLAVA_VENV)
	$(LLAVA_VENV)/bin/pip install $(PIP_FLAGS) $(TORCH)
	$(LLAVA_VENV)/bin/pip install $(PIP_FLAGS) $(LLAVA_DEPS)
	$(LLAVA_VENV)/bin/pip install $(PIP_FLAGS) --no-deps $(LLAVA)
	touch $@

# DeepSpeed's own ZeRO reader checks the ZeRO-2/3 directories the tests build
# (tests/peers/deepspeed_peer.py). It ships as an sdist that imports torch to build, so torch goes in
# first and the build uses it; DS_BUILD_OPS=0 compiles no CUDA/C++ ops (none are needed to read).
$(DEEPSPEED_VENV)/.installed:
	$(PYTHON) -m venv $(DEEPSPEED_VENV)
	$(DEEPSPEED_VENV)/bin/pip install $(PIP_FLAGS) $(TORCH) numpy setuptools wheel
	DS_BUILD_OPS=0 $(DEEPSPEED_VENV)/bin/pip install $(PIP_FLAGS) --no-build-isolation $(DEEPSPEED)
	touch $@

$(OPTIMUM_VENV)/.installed:
	$(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/pip install $(PIP_FLAGS) $(TORCH)
	$(OPTIMUM_VENV)/bin/pip install $(PIP_FLAGS) $(OPTIMUM)
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python examples/demo.py demo-out

test: $(VENV)/.installed $(VENV)/.installed-mindspore $(VENV)/.installed-nanotron $(LITGPT_VENV)/.installed \
		$(LLAVA_VENV)/.installed $(DEEPSPEED_VENV)/.installed
	$(VENV)/bin/python -m pytest -q

bench: $(VENV)/.installed $(LITGPT_VENV)/.installed $(OPTIMUM_VENV)/.installed
	$(VENV)/bin/python bench/bench_convert.py
	$(VENV)/bin/python bench/bench_onnx.py

# coverage-guided fuzzing of every reader; what it finds worth keeping stays in fuzz/corpus/ and
# tests/test_fuzz_corpus.py replays it in every test run. Then differential fuzzing: mutated files
# through safetensors, torch.load and (where installed) MindSpore against our readers; it fails on
# any disagreement
FUZZ_SECONDS ?= 60
FUZZ_DIFF ?= --safetensors 20000 --torch 5000 --ckpt 2000
ATHERIS ?= atheris==3.0.0
fuzz: $(VENV)/.installed
	$(VENV)/bin/pip install $(PIP_FLAGS) $(ATHERIS)
	$(VENV)/bin/python fuzz/seed_corpus.py
	cd fuzz && for t in safetensors torch ckpt config-json litgpt-yaml; do \
		../$(VENV)/bin/python fuzz_readers.py $$t -max_total_time=$(FUZZ_SECONDS) corpus/$$t || exit 1; done
	$(VENV)/bin/python fuzz/differential.py $(FUZZ_DIFF)

clean:
	rm -rf demo-out .pytest_cache
