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

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check pat tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
