# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv from the requirements when it is missing or older than them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test clean

$(VENV)/.requirements: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.requirements-dev: $(VENV)/.requirements requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(VENV)/.requirements
	$(PY) demo.py

test: $(VENV)/.requirements-dev
	$(PY) -m pytest -q tests

clean:
	rm -rf data runs Images/demo_*
