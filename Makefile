.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

help: ## Show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

# The venv is (re)built when missing or older than pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## Build .venv with the dev extra

lint: $(STAMP) ## ruff check, ruff format --check, mypy (strict on the packages)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint ## Lint, then the whole default suite on SQLite and PostgreSQL
	$(BIN)/pytest -m "not slow"

test-all: lint ## Lint, then every test including the slow reliability tests
	$(BIN)/pytest

docs: $(STAMP) ## Build the API reference and guides into site/ (strict, offline)
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]'
	$(BIN)/mkdocs build --strict

demo: $(STAMP) ## Migrate ./tiu.db and play the demo scenario
	$(BIN)/tiu demo

serve: $(STAMP) ## Serve examples/service on 127.0.0.1:8000 over ./tiu.db (TIU_DATABASE_URL)
	$(BIN)/python -m examples.service

bench: $(STAMP) ## Benchmarks against eventsourcing and the raw drivers
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench

clean: ## Remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis site

.PHONY: help venv lint test test-all docs demo serve bench clean
