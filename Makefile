# Two commands set everything up on a fresh machine with Python 3.10+:
#   make demo   creates .venv, installs pat, runs the main job on the embedded digits dataset
#   make test   creates .venv, installs pat with test extras, runs the suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/pat demo

# a worker per core, at most 4 (each holds its own torch): every test runs torch on one
# thread (tests/conftest.py), so the cores are shared out by workers, not by threads
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --durations=12

lint: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check pat tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
