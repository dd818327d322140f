# Runs: the two commands a newcomer needs are `make up` (run) and `make test` (test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
GEN := shared/gen/runs/v1/run_pb2.py
PROTOS := $(wildcard protos/runs/v1/*.proto)

.PHONY: up api worker proto migrate bytecode chromium test test-two-processes test-features test-features-auth fuzz lint bench replay clean help

help:
	@echo "make up        run the API with one worker (embedded PostgreSQL unless DATABASE_URL is set)"
	@echo "make test      install what is needed and run every test"
	@echo "make fuzz      the property-based fuzz suite of every RPC with FUZZ_EXAMPLES=2000 per group (long)"
	@echo "make api | worker | migrate | proto | lint | bench | replay"

# make up: the runtime dependencies and protoc (extra "proto", to generate shared/gen), no dev tools.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the runtime dependencies into $(VENV)"
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet -e '.[proto]'
	@touch $(STAMP)

# make test, lint, fuzz: the dev tools too, and shared/gen again with mypy-protobuf's type stubs.
$(DEV_STAMP): $(STAMP)
	@echo "installing the dev tools into $(VENV)"
	@$(PY) -m pip install --quiet -e '.[dev]'
	@$(PY) -m shared.protogen
	@touch $(DEV_STAMP)

$(GEN): $(STAMP) $(PROTOS) shared/protogen.py
	@echo "generating shared/gen from protos/"
	@$(PY) -m shared.protogen

proto: $(STAMP)
	$(PY) -m shared.protogen

install: $(GEN)

# GRPC_ENABLE_FORK_SUPPORT=false: gRPC's fork handlers serve children that use gRPC without exec; the API's
# children (the worker, pg_ctl) exec at once, and the handlers only print a stray line when the API stops.
up: $(GEN)
	@echo "starting the API with one worker (python -m services.run_api --with-worker); Ctrl-C stops them"
	@GRPC_ENABLE_FORK_SUPPORT=false $(PY) -m services.run_api --with-worker

api: $(GEN)
	$(PY) -m services.run_api

worker: $(GEN)
	$(PY) -m services.run_worker

migrate: $(GEN)
	$(PY) -m services.run_api migrate

replay: $(GEN)
	$(PY) -m services.run_api replay

# Everything with auth off (the default on loopback), and the acceptance and fault scenarios
# (features/) a second time with every call authenticated by API keys (RUNS_TEST_AUTH=required), in
# one session spread over TEST_PROCESSES pytest-xdist workers, a test file per worker at a time.
# Each worker has its own PostgreSQL server or databases, ports and files (conftest.py).
# The sources are compiled once first: the suite starts hundreds of API and worker processes, and
# with PYTHONDONTWRITEBYTECODE set each would compile them again (0.3 s of CPU per API and worker).
TEST_PROCESSES ?= 3
XDIST := -n $(TEST_PROCESSES) --dist loadfile
bytecode: $(DEV_STAMP) $(GEN)
	$(PY) -m compileall -q services shared

# The concurrency and fault scenarios again with every API a group of two processes (RUN_API_PROCESSES).
TWO_PROCESS_SCENARIOS := features/test_faults.py features/test_postgres_restart.py features/test_lifecycle.py \
	features/test_run_api.py -k "concurrent or sigkilled or killing or restarting or postgresql or exactly_once or watchers"

# The dashboard's browser tests drive Debian's chromium (Playwright never downloads a browser).
CHROMIUM ?= /usr/bin/chromium
chromium:
	@test -x $(CHROMIUM) || { \
		echo "installing Debian's chromium for the dashboard's browser tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

test: bytecode chromium
	$(PY) -m pytest -q $(XDIST) --auth-passes off,required
	RUNS_TEST_API_PROCESSES=2 $(PY) -m pytest -q $(XDIST) $(TWO_PROCESS_SCENARIOS)

test-two-processes: bytecode
	RUNS_TEST_API_PROCESSES=2 $(PY) -m pytest -q $(XDIST) $(TWO_PROCESS_SCENARIOS)

test-features-auth: bytecode
	RUNS_TEST_AUTH=required $(PY) -m pytest -q $(XDIST) features/

test-features: bytecode
	$(PY) -m pytest -q $(XDIST) features/

# tests/test_fuzz.py runs 40 examples per RPC group inside `make test`; this runs many more.
FUZZ_EXAMPLES ?= 2000
fuzz: $(DEV_STAMP) $(GEN)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py --timeout=3600

lint: $(DEV_STAMP) $(GEN)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/buf lint protos
	$(VENV)/bin/mypy shared services runs_client

# Each phase on a fresh database (DATABASE_URL's server, else an embedded PostgreSQL) and API process;
# a table, then one JSON line per figure. E.g. make bench BENCH_ARGS="--history 1000000 --secure",
# BENCH_ARGS="--phases drain --drain 5000 --profile prof/"; see python -m services.bench --help.
bench: $(GEN)
	$(PY) -m services.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) shared/gen
