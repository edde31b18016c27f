# hybridflow — two commands: `make quickstart` and `make test` (each creates .venv if needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (this repo's CI machines keep it on disk; elsewhere pick your build).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= ray,dev
comma := ,
STAMP := $(VENV)/.installed-$(shell cksum < setup.py | cut -d' ' -f1)-$(subst $(comma),_,$(EXTRAS))
PYTEST_ARGS ?=

.PHONY: venv test quickstart bench clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-* && touch $@

# One torch thread per process: the suite runs several processes (Ray, gloo ranks) on 2 cores.
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -m "not vllm and not megatron" $(PYTEST_ARGS)

quickstart: venv
	OMP_NUM_THREADS=1 $(PY) recipes/quickstart.py

clean:
	rm -rf runs .pytest_cache
