# make run  : create .venv, install gridcouple, run the demo scenario on the local backend
# make test : install the test extras, start the real services, run pytest, stop the services
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp

.PHONY: run test lint bench services-up services-down clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP)-run: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[coupler]'
	touch $@

$(STAMP)-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(STAMP)-run

run: $(STAMP)-run
	$(VENV)/bin/gridcouple run weak-coupling

# Lint first (ruff, and mypy on src: the package ships py.typed). Services are stopped whatever
# pytest says; pytest's own exit code is the result.
test: lint
	@scripts/services up
	@status=0; $(PY) -m pytest $(PYTEST_ARGS) || status=$$?; scripts/services down; exit $$status

lint: $(STAMP)-test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src

bench: $(STAMP)-test
	$(PY) -m pip install -q -e '.[bench]'
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

services-up:
	scripts/services up

services-down:
	scripts/services down

clean:
	rm -rf $(VENV) .gridcouple .pytest_cache
