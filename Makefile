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
SET ?=
DRY_RUN ?=

.PHONY: help setup test test-fast demo demo-quick demo-ablation demo-race bench density-report \
        curate recaption train-stage1 train-stage2 train-stage3 clean

help:
	@echo "make demo            the whole system end to end on CPU, and proof that it learns (about 8 min, 2 cores)"
	@echo "make demo-quick      the same steps on a handful of pictures: proves the plumbing in 2-4 minutes"
	@echo "make demo-ablation   the demo plus the dense/sparse and stage-1-init ablations"
	@echo "make demo-race       stage 2 with four recipes (eps, v, rectified flow, flow + TREAD) against compute (~30 min) [SET=\"parallel=4 ...\"]"
	@echo "make test            set up .venv and run the test suite"
	@echo "make bench           benchmarks (ratios measured side by side); see BENCHMARKS.md"
	@echo "make curate CONFIG=configs/curation/...yaml"
	@echo "make recaption CONFIG=configs/recaption/...yaml"
	@echo "make train-stage1|train-stage2|train-stage3 CONFIG=... NUM_GPUS=... [HOSTFILE=...] [SET=\"a.b=c ...\"] [DRY_RUN=1]"
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

demo: $(STAMP)
	$(PY) -m demo --out $(OUT)/demo

demo-quick: $(STAMP)
	$(PY) -m demo --quick --out $(OUT)/demo-quick

demo-ablation: $(STAMP)
	$(PY) -m demo --out $(OUT)/demo-ablation --ablation

demo-race: $(STAMP)
	$(PY) -m demo.race --out $(OUT)/demo-race $(foreach s,$(SET),--set $(s))

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
	    --num-gpus $(NUM_GPUS) $(if $(HOSTFILE),--hostfile $(HOSTFILE)) $(foreach s,$(SET),--set $(s)) \
	    $(if $(DRY_RUN),--dry-run)

clean:
	rm -rf $(OUT) .pytest_cache
