# Runs: the two commands a newcomer needs are `make up` (run) and `make test` (test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GEN := shared/gen/runs/v1/run_pb2.py
PROTOS := $(wildcard protos/runs/v1/*.proto)

.PHONY: up api worker proto migrate test test-features test-features-auth fuzz lint bench replay clean help

help:
	@echo "make up        run the API with one worker (embedded PostgreSQL unless DATABASE_URL is set)"
	@echo "make test      install what is needed and run every test"
	@echo "make fuzz      the property-based fuzz suite of every RPC with FUZZ_EXAMPLES=2000 per group (long)"
	@echo "make api | worker | migrate | proto | lint | bench | replay"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(GEN): $(STAMP) $(PROTOS) shared/protogen.py
	$(PY) -m shared.protogen

proto: $(STAMP)
	$(PY) -m shared.protogen

install: $(GEN)

up: $(GEN)
	$(PY) -m services.run_api --with-worker

api: $(GEN)
	$(PY) -m services.run_api

worker: $(GEN)
	$(PY) -m services.run_worker

migrate: $(GEN)
	$(PY) -m services.run_api migrate

replay: $(GEN)
	$(PY) -m services.run_api replay

# Everything once with auth off (the default on loopback), then the acceptance and fault
# scenarios again with every call authenticated by API keys (RUNS_TEST_AUTH=required).
test: $(GEN)
	$(PY) -m pytest -q
	RUNS_TEST_AUTH=required $(PY) -m pytest -q features/

test-features-auth: $(GEN)
	RUNS_TEST_AUTH=required $(PY) -m pytest -q features/

test-features: $(GEN)
	$(PY) -m pytest -q features/

# tests/test_fuzz.py runs 40 examples per RPC group inside `make test`; this runs many more.
FUZZ_EXAMPLES ?= 2000
fuzz: $(GEN)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py --timeout=3600

lint: $(GEN)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/buf lint protos
	$(VENV)/bin/mypy shared services

# Each phase on a fresh database (DATABASE_URL's server, else an embedded PostgreSQL) and API process;
# a table, then one JSON line per figure. E.g. make bench BENCH_ARGS="--history 1000000 --secure",
# BENCH_ARGS="--phases drain --drain 5000 --profile prof/"; see python -m services.bench --help.
bench: $(GEN)
	$(PY) -m services.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) shared/gen
