# Two commands do everything on a fresh machine (Python 3.10+):
#   make demo   set-up, then the whole job on the built-in corpora (teacher, students alone and distilled, table)
#   make test   set-up, then the test suite
PYTHON ?= python3
VENV ?= .venv
PY = $(VENV)/bin/python

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(PY) main.py --preset demo --mode demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf runs $(VENV)
