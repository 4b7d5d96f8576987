# Two set-up commands on a fresh machine:
#   make bench   the side-by-side benchmark table, then the end-to-end demo (the main job)
#   make test    the test suite (what CI runs, via .ci/run)
#   make wheels / make sdist / make test-wheel   cluster wheels (README "Wheels")
# Each creates .venv with the pinned torch when missing, builds the extension
# (with CUDA kernels when nvcc is present), then runs. To use an interpreter that
# already has your torch instead of .venv: make test PYTHON=/path/to/python

TORCH_VERSION ?= 2.14.1
# SASS for sm_80/sm_90 and PTX for compute_90, which newer GPUs (Blackwell) JIT-compile
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
export MAX_JOBS ?= 2

ifdef PYTHON
PY := $(PYTHON)
ENV_STAMP := build/.stamp-env-$(subst /,_,$(PYTHON))
else
PY := .venv/bin/python
ENV_STAMP := .venv/.stamp-env
endif
EXT_STAMP := build/.stamp-ext-$(subst /,_,$(PY))
SOURCES := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' | sort) setup.py pyproject.toml
# The sources' content hash, rewritten only when it changes: the extension is rebuilt
# on content, so an edit made while a build runs (older than that build's stamp) is
# still seen by the next make, and a touch alone rebuilds nothing.
SRC_HASH := build/.src-hash

.PHONY: test lint format bench build wheel wheels test-wheel sdist info clean

test: lint $(EXT_STAMP)
	$(PY) -m pytest -q tests

# Seconds: ruff (check, format --check) over the Python tree, clang-format over csrc/.
# Both are pinned wheels from PyPI, installed into the venv on first use.
RUFF_VERSION := 0.17.6
CLANG_FORMAT_VERSION := 23.1.5
LINT_STAMP := build/.stamp-lint-$(subst /,_,$(PY))-$(RUFF_VERSION)-$(CLANG_FORMAT_VERSION)
CSRC := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')
$(LINT_STAMP): $(ENV_STAMP)
	$(PY) -m pip install -q ruff==$(RUFF_VERSION) clang-format==$(CLANG_FORMAT_VERSION)
	mkdir -p build && touch $@
CLANG_FORMAT := $(PY) -c "import sys, clang_format; sys.argv[0] = 'clang-format'; sys.exit(clang_format.clang_format())"
lint: $(LINT_STAMP)
	$(PY) -m ruff check --quiet .
	$(PY) -m ruff format --check --quiet .
	$(CLANG_FORMAT) --dry-run -Werror $(CSRC)

format: $(LINT_STAMP)
	$(PY) -m ruff check --fix --quiet .
	$(PY) -m ruff format --quiet .
	$(CLANG_FORMAT) -i $(CSRC)

# one process per benchmark file, so each starts from the same process state
# (in one shared process earlier files changed later ones' figures, e.g. through
# the C allocator's state: benchmarks/HISTORY.md, third session); the figures also
# land as data in benchmarks/results/<machine>-<date>.json
BENCH_JSON := build/bench-json
bench: $(EXT_STAMP)
	@rm -rf $(BENCH_JSON) && mkdir -p $(BENCH_JSON); rc=0; for f in benchmarks/bench_*.py; do \
	  $(PY) -m pytest -q $$f -o python_files='bench_*.py' -p no:cacheprovider --benchmark-disable-gc \
	    --benchmark-columns=median,iqr,rounds --benchmark-json=$(BENCH_JSON)/$$(basename $$f .py).json || rc=1; \
	done; $(PY) -m benchmarks.collect $(BENCH_JSON) || rc=1; \
	$(PY) -m opensora_fast demo --out benchmarks/results || rc=1; exit $$rc

info: $(EXT_STAMP)
	$(PY) -m opensora_fast info

build: $(EXT_STAMP)

# A wheel for the arch list in TORCH_CUDA_ARCH_LIST (clusters: "8.0;8.6;9.0;10.0;12.0+PTX"),
# this interpreter only, tagged +cu130torch2.14 but linux_x86_64 (see `make wheels`).
wheel: $(ENV_STAMP)
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

# Cluster wheels: one manylinux wheel per Python in WHEEL_PYTHONS found here (each gets
# a build venv in WHEEL_VENVS with torch==$(TORCH_VERSION)), for TORCH_CUDA_ARCH_LIST
# when given, else the cluster list. Into dist/, with dist/wheels.txt (sizes, times).
WHEEL_PYTHONS ?= 3.10 3.11 3.12
WHEEL_VENVS ?= build/wheel-venvs
ifeq ($(origin TORCH_CUDA_ARCH_LIST),file)
WHEEL_ARCHS := 8.0;8.6;9.0;10.0;12.0+PTX
else
WHEEL_ARCHS := $(TORCH_CUDA_ARCH_LIST)
endif
wheels:
	@pys=$$(tools/wheel_pythons.sh $(WHEEL_VENVS) $(TORCH_VERSION) $(WHEEL_PYTHONS)) && [ -n "$$pys" ] || { echo "wheels: no usable Python"; exit 1; }; \
	TORCH_CUDA_ARCH_LIST="$(WHEEL_ARCHS)" tools/build_wheels.sh dist $$pys

# The slow wheel test: a clean clone's wheel in a fresh venv with only torch, the CPU
# suite run against it; and the sdist built against that venv's torch.
test-wheel: $(ENV_STAMP)
	OPENSORA_FAST_TEST_WHEEL=1 $(PY) -m pytest -q -s -m slow tests/test_wheel.py

# dist/opensora_fast-<version>.tar.gz; install with pip install --no-build-isolation.
sdist: $(ENV_STAMP)
	$(PY) tools/sdist.py dist

.venv/.stamp-env:
	python3 -m venv .venv
	.venv/bin/python -m pip install -q torch==$(TORCH_VERSION) numpy pytest pytest-benchmark ninja expecttest hypothesis einops av Pillow safetensors huggingface_hub tqdm matplotlib
	touch $@

build/.stamp-env-%:
	$(PY) -c "import torch" || { echo "PYTHON=$(PY) has no torch: install one first"; exit 1; }
	$(PY) -c "import pytest, pytest_benchmark, numpy, hypothesis, einops, av, PIL, safetensors, huggingface_hub, tqdm, matplotlib" 2>/dev/null || $(PY) -m pip install -q pytest pytest-benchmark numpy hypothesis einops av Pillow safetensors huggingface_hub tqdm matplotlib
	mkdir -p build && touch $@

$(SRC_HASH): FORCE
	@mkdir -p build; cat $(SOURCES) | sha256sum > $@.new; if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi
FORCE:

$(EXT_STAMP): $(ENV_STAMP) $(SRC_HASH)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m opensora_fast info
	mkdir -p build && touch $@

clean:
	rm -rf build dist *.egg-info opensora_fast/*.so
