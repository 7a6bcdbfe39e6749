# The two commands of the README. Each does all set-up on a fresh machine first.
PYTHON ?= python3

.PHONY: demo test setup browser gpu-check

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

browser:
	PYTHON=$(PYTHON) bash scripts/install_browser.sh

demo: setup
	$(PYTHON) -m fp4compile demo

test: setup browser
	$(PYTHON) -m pytest -q -rs

# The prepared check of the CUDA path on a GPU machine (DEVELOPERS.md); needs no setup.
gpu-check:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py
