# Two commands matter: `make dev` (run everything locally) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= deploy/dev/smsbridge.toml
PYTEST_ARGS ?=

.PHONY: dev test lint lock bench reliability campaign clean promtool broker

# Every package comes pinned and hashed from requirements-dev.lock (what CI and the tests run
# on), then the project itself, editable, without dependencies; pip check catches a lock that
# no longer satisfies pyproject.toml (re-run `make lock`).
$(STAMP): pyproject.toml requirements-dev.lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "Python 3.11 is required (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
	@touch $(STAMP)

# Rewrites requirements-dev.lock (CI, `make test`) and requirements.lock (the image, at the same
# versions) from pyproject.toml's ranges for Python 3.11 on Linux, with hashes. Existing pins are
# kept unless pyproject.toml excludes them; LOCK_ARGS=--upgrade moves all to the newest allowed.
UV_VERSION := 0.13.9
UV_VENV := .smsbridge/uv
LOCK_ARGS ?=
LOCK := $(UV_VENV)/bin/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 \
	--python-platform linux --quiet $(LOCK_ARGS)
lock:
	@test -x $(UV_VENV)/bin/uv || { $(PYTHON) -m venv $(UV_VENV) && \
		$(UV_VENV)/bin/pip install --quiet uv==$(UV_VERSION); }
	UV_CUSTOM_COMPILE_COMMAND="make lock" $(LOCK) --all-extras -o requirements-dev.lock
	UV_CUSTOM_COMPILE_COMMAND="make lock" $(LOCK) -c requirements-dev.lock -o requirements.lock

# Apache Kafka's jars (deploy/kafka/pom.xml) through Maven, when Java 17+ and Maven are here and
# the cache lacks them; otherwise one line says the embedded broker will be the Tansu fallback.
broker: $(STAMP)
	@$(BIN)/smsbridge broker fetch

dev: $(STAMP) broker
	$(BIN)/smsbridge --config $(CONFIG) dev

# Fire a campaign at a running `make dev`: make campaign N=1000
N ?= 1000
campaign: $(STAMP)
	$(BIN)/smsbridge --config $(CONFIG) simulate campaign --recipients $(N)

# promtool (Debian package prometheus) checks the alert rules in tests/deploy. Installed with
# apt-get when we are root; elsewhere install it yourself, or those tests skip and say why.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing promtool (apt-get install prometheus)"; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
			{ apt-get update -qq >/dev/null 2>&1 && \
			  apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } || \
			echo "promtool: apt-get failed; the promtool tests will be skipped"; \
		else \
			echo "promtool not found (Debian package prometheus); the promtool tests will be skipped"; \
		fi; }

# pytest exits 5 when a selection (PYTEST_ARGS=-k ...) matches no test: say so, do not fail.
test: $(STAMP) promtool broker
	@$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check shared services tools simulators tests bench
	$(BIN)/ruff format --check shared services tools simulators tests bench
	$(BIN)/mypy

# All benchmarks, or some: make bench BENCH="ingress e2e" BENCH_ARGS="--recipients 20000".
# Not part of `make test`. Results in bench/results/ and README.md (bench/__main__.py).
BENCH ?=
BENCH_ARGS ?=
bench: $(STAMP) broker
	$(BIN)/python -m bench $(BENCH) $(BENCH_ARGS)

# The reliability suite in its full form (chaos on a 20,000-recipient campaign, 50 clients for
# 60 s, long property runs); `make test` runs the same tests in their short form.
reliability: $(STAMP) broker
	$(BIN)/pytest tests/reliability --reliability-full $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .smsbridge/kafka-dist $(UV_VENV)
