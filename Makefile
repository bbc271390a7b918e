# Two commands do everything on a fresh machine: `make demo` and `make test` (and `make bench`).
# Each creates .venv from the requirements when it is missing or older than them, saying so as it goes.
# A shorter demo: `make demo ARGS="epochs=4"` (any key=value of hyperparameters.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: demo test bench clean

$(VENV)/.requirements: requirements.txt
	@echo "== creating $(VENV) and installing requirements.txt (PyTorch and the rest; first run only, minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar on -r requirements.txt
	touch $@

$(VENV)/.requirements-dev: $(VENV)/.requirements requirements-dev.txt requirements-onnx.txt
	@echo "== installing requirements-dev.txt into $(VENV) (the tests' references; first run only)"
	$(PY) -m pip install --progress-bar on -r requirements-dev.txt
	touch $@

demo: $(VENV)/.requirements
	@echo "== demo.py $(ARGS): generate, prepare, train, predict, evaluate, render (loading PyTorch ...)"
	$(PY) demo.py $(ARGS)

test: $(VENV)/.requirements-dev
	$(PY) -m pytest -q tests

# Every benchmark that runs on a CPU, one after another, each printing its table (gpu_check.sh needs a GPU).
bench: $(VENV)/.requirements-dev
	for script in benchmarks/*_bench.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf data runs Images/demo_*
