# Two commands matter on a fresh machine: `make demo` and `make test`. Both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= outputs
CONFIG ?=
NUM_GPUS ?= 1
HOSTFILE ?=

.PHONY: help setup test test-fast demo demo-full demo-ablation bench density-report \
        curate recaption train-stage1 train-stage2 train-stage3 clean

help:
	@echo "make demo            the whole system end to end on CPU, in minutes (shortened: proves the plumbing)"
	@echo "make demo-full       the full-size demo (not yet within 15 minutes on 2 cores)"
	@echo "make test            set up .venv and run the test suite"
	@echo "make bench           benchmarks (ratios measured side by side); see BENCHMARKS.md"
	@echo "make curate CONFIG=configs/curation/...yaml"
	@echo "make recaption CONFIG=configs/recaption/...yaml"
	@echo "make train-stage1|train-stage2|train-stage3 CONFIG=... NUM_GPUS=... [HOSTFILE=...]"
	@echo "make density-report CONFIG=configs/density/...yaml"

# torch first, pinned to the CPU wheel present on the machine; then the project, whose ranges 2.13.0 satisfies.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The shortened demo runs every step end to end in minutes; the full-size one (issue 7) does not fit that budget
# on a 2-core CPU yet, so it has its own target until it does.
demo: $(STAMP)
	$(PY) -m pipelines.demo --quick --out $(OUT)/demo

demo-full: $(STAMP)
	$(PY) -m pipelines.demo --out $(OUT)/demo

demo-ablation: $(STAMP)
	$(PY) -m pipelines.demo --out $(OUT)/demo-ablation --ablation

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

curate: $(STAMP)
	$(PY) -m pipelines.curate --config $(CONFIG)

recaption: $(STAMP)
	$(PY) -m pipelines.recaption --config $(CONFIG)

density-report: $(STAMP)
	$(PY) -m pipelines.density --config $(or $(CONFIG),configs/density/demo.yaml)

train-stage1 train-stage2 train-stage3: $(STAMP)
	$(PY) -m training.launch --stage $(subst train-stage,,$@) --config $(CONFIG) \
	    --num-gpus $(NUM_GPUS) $(if $(HOSTFILE),--hostfile $(HOSTFILE))

clean:
	rm -rf $(OUT) .pytest_cache
