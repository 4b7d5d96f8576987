# Two set-up commands on a fresh machine:
#   make bench   the side-by-side benchmark table (the main job)
#   make test    the test suite (what CI runs, via .ci/run)
# Each creates .venv with the pinned torch when missing, builds the extension
# (with CUDA kernels when nvcc is present), then runs. To use an interpreter that
# already has your torch instead of .venv: make test PYTHON=/path/to/python

TORCH_VERSION ?= 2.14.1
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2

ifdef PYTHON
PY := $(PYTHON)
ENV_STAMP := build/.stamp-env-$(subst /,_,$(PYTHON))
else
PY := .venv/bin/python
ENV_STAMP := .venv/.stamp-env
endif
EXT_STAMP := build/.stamp-ext-$(subst /,_,$(PY))
SOURCES := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu') setup.py pyproject.toml

.PHONY: test bench build wheel info clean

test: $(EXT_STAMP)
	$(PY) -m pytest -q tests

bench: $(EXT_STAMP)
	$(PY) -m pytest -q benchmarks -o python_files='bench_*.py' -p no:cacheprovider --benchmark-disable-gc --benchmark-columns=median,iqr,rounds

info: $(EXT_STAMP)
	$(PY) -m opensora_fast info

build: $(EXT_STAMP)

# A wheel for the arch list in TORCH_CUDA_ARCH_LIST (clusters: "8.0;8.6;9.0;10.0;12.0+PTX").
wheel: $(ENV_STAMP)
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

.venv/.stamp-env:
	python3 -m venv .venv
	.venv/bin/python -m pip install -q torch==$(TORCH_VERSION) numpy pytest pytest-benchmark ninja expecttest hypothesis einops av Pillow safetensors huggingface_hub tqdm
	touch $@

build/.stamp-env-%:
	$(PY) -c "import torch" || { echo "PYTHON=$(PY) has no torch: install one first"; exit 1; }
	$(PY) -c "import pytest, pytest_benchmark, numpy, hypothesis, einops, av, PIL, safetensors, huggingface_hub, tqdm" 2>/dev/null || $(PY) -m pip install -q pytest pytest-benchmark numpy hypothesis einops av Pillow safetensors huggingface_hub tqdm
	mkdir -p build && touch $@

$(EXT_STAMP): $(ENV_STAMP) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m opensora_fast info
	mkdir -p build && touch $@

clean:
	rm -rf build dist *.egg-info opensora_fast/*.so
