# Fresh machine: `make run` (the main job) and `make test`. Both create .venv with pip if missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install run test smoke serve workers stop clean-work

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

# Every stage on a tiny PACS subset (6 images per domain and class, 64 px, one epoch) in a temporary copy of
# the project, through the Prefect flow: the main results are not touched, and the copy is removed afterwards
# (`make smoke KEEP=1` keeps it and logs its path).
smoke: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m flows.dg_pipeline --smoke $(if $(KEEP),--keep)

# A local Prefect server on 127.0.0.1 (SQLite under .prefect/) and the process serving the deployments
# dg-pipeline/pacs, dg-pipeline/smoke and dg-pipeline/retrain-new-domains; `make stop` stops both (also a server
# left behind by a serving process that died) and fails if the port still has a listener it could not stop.
serve: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m flows.serve --detach

# N Prefect process workers on the work pool fanout.pool (default bne), each in its own workspace .workers/w<i>/, and
# the deployment dg-fold/<fanout.deployment> they run; needs a server (make serve, or PREFECT_API_URL from the
# environment). Then `prefect deployment run dg-pipeline/pacs --param mode=pool` fans the folds out to them.
N ?= 2
workers: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PREFECT_API_URL="$${PREFECT_API_URL:-http://127.0.0.1:4200/api}" $(PY) -m flows.workers --start $(N)

# Stops the workers (if any), then serving and its server.
stop:
	@$(PY) -m flows.workers --stop
	@$(PY) -m flows.serve --stop

clean-work:
	rm -rf data/lodo data/cache
