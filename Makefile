# Two commands matter: `make dev` (run everything locally) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= deploy/dev/smsbridge.toml
PYTEST_ARGS ?=

.PHONY: dev test lint bench reliability campaign clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "Python 3.11 is required (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]'
	@touch $(STAMP)

dev: $(STAMP)
	$(BIN)/smsbridge --config $(CONFIG) dev

# Fire a campaign at a running `make dev`: make campaign N=1000
N ?= 1000
campaign: $(STAMP)
	$(BIN)/smsbridge --config $(CONFIG) simulate campaign --recipients $(N)

# pytest exits 5 when a selection (PYTEST_ARGS=-k ...) matches no test: say so, do not fail.
test: $(STAMP)
	@$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check shared services tests bench
	$(BIN)/ruff format --check shared services tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
