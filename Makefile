# Fresh machine: `make run` (the main job) and `make test`. Both create .venv with pip if missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install run test clean-work

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

install: $(VENV)/.installed

# The main job: the DVC pipeline (ingest -> validate -> cache -> leave-one-domain-out DeepAll vs BNE) on PACS.
run: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

test: install
	$(PY) -m pytest

clean-work:
	rm -rf data/lodo data/cache
