# make study  -- create .venv if missing, install, run the whole study (PROFILE=tiny by default)
# make test   -- create .venv if missing, install, run the test suite
# make lint   -- ruff (configured in pyproject.toml)
PROFILE ?= tiny
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install study test lint bench clean-runs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

install: $(VENV)/.installed

study: install
	$(BIN)/lorafind study --profile $(PROFILE)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/lorafind bench synth --profile $(PROFILE)

clean-runs:
	rm -rf runs/$(PROFILE) papermill_runs/$(PROFILE)

# make dryrun        -- the paper profile's code path and settings on CPU, counts cut (runs/dryrun/; ~8 GB while it runs)
# make clean-dryrun  -- remove everything the dry run wrote
DRYRUN_ARGS ?=
.PHONY: dryrun clean-dryrun
dryrun: install
	nice -n 5 $(BIN)/python -m lorafind_utils.dryrun $(DRYRUN_ARGS)

clean-dryrun:
	rm -rf runs/dryrun
