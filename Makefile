# The two commands of the README. Each does all set-up on a fresh machine first.
PYTHON ?= python3

.PHONY: demo test setup browser gpu-check

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

browser:
	PYTHON=$(PYTHON) bash scripts/install_browser.sh

demo: setup
	$(PYTHON) -m fp4compile demo

# Test files run in parallel, one worker per core up to 4 (tests/conftest.py
# shares the cores among them); TEST_WORKERS=1 runs them one after another.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))" 2>/dev/null || echo 1)

test: setup browser
	$(PYTHON) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile --durations=25

# The prepared check of the CUDA path on a GPU machine (DEVELOPERS.md); needs no setup.
gpu-check:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py
