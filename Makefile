# Everything installs into .venv. torch is pinned and installed first; which build pip takes (CPU or CUDA) is your
# index's: for the CPU build from PyPI's torch, set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: install test demo demo-transfer demo-assets bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,demo]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(VENV)/bin/cprd-pipeline demo --out runs/demo

# The setting where the teacher's knowledge measurably reaches the student (docs/demo.md): a student of the
# teacher's size, 32 mined negatives, 12 test galleries; about 25 minutes on 2 cores.
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
	rm -rf $(VENV) runs bench/results .pytest_cache
