# Two commands do everything on a fresh machine: `make demo` and `make test` (and `make bench`).
# Each creates .venv from the requirements when it is missing or older than them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.requirements: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.requirements-dev: $(VENV)/.requirements requirements-dev.txt requirements-onnx.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(VENV)/.requirements
	$(PY) demo.py

test: $(VENV)/.requirements-dev
	$(PY) -m pytest -q tests

# Every benchmark that runs on a CPU, one after another, each printing its table (gpu_check.sh needs a GPU).
bench: $(VENV)/.requirements-dev
	for script in benchmarks/*_bench.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf data runs Images/demo_*
