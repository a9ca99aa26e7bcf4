# Everything installs into .venv. torch is pinned and installed first; which build pip takes (CPU or CUDA) is your
# index's: for the CPU build from PyPI's torch, set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: install test test-openclip demo demo-tour demo-transfer demo-assets bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,demo]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

# The open_clip students' tests, which `make test` skips: open_clip needs torchvision, and pip's torchvision for
# x86-64 Linux is a CUDA build that does not import beside the CPU torch above. A second environment with a
# matching pair (several GB) runs them.
OC_VENV  := .venv-openclip
OC_TORCH ?= torch==2.14.1 torchvision==0.29.1
test-openclip:
	test -x $(OC_VENV)/bin/python || $(PYTHON) -m venv $(OC_VENV)
	$(OC_VENV)/bin/python -m pip install --quiet $(OC_TORCH)
	$(OC_VENV)/bin/python -m pip install --quiet -e ".[test,openclip]"
	$(OC_VENV)/bin/python -m pytest -q tests/pipeline/test_openclip.py tests/stages/test_distill.py -k "open_clip or openclip"

# The teacher's knowledge reaching a student of the teacher's size at about 1.4x (KL) and 1.8-2.2x (the CPRD row) the
# cost of contrastive training (data/demo.yaml: budgets of 2 and 3 outside items per query); 8 to 9.5 minutes on 2
# cores.
demo: install
	$(VENV)/bin/cprd-pipeline demo --out runs/demo

# Every row of the pipeline on the small 64x2 student (data/demo-tour.yaml); about 6 minutes on 2 cores.
demo-tour: install
	$(VENV)/bin/cprd-pipeline demo --recipe data/demo-tour.yaml --out runs/demo-tour

# The same transfer setting with the whole lists, and more rows (docs/demo.md): every list entry encoded with
# gradient, 2.7-3x the epoch; about 25 minutes on 2 cores.
demo-transfer: install
	$(VENV)/bin/cprd-pipeline demo --recipe data/demo-transfer.yaml --out runs/demo-transfer

# Rebuild the demo's packed student and teacher (data/demo/) from scratch: about 35 minutes on 2 cores.
demo-assets: install
	$(VENV)/bin/cprd-pipeline demo-assets --out data/demo --work runs/demo-assets

bench: install
	$(PY) -m bench.run_all

bench-quick: install
	$(PY) -m bench.run_all --quick

clean:
	rm -rf $(VENV) $(OC_VENV) runs bench/results .pytest_cache
