# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when needed.
VENV ?= .venv
PYTHON ?= python3
# Users bring their own torch; this pin is a CPU-friendly default for the demo and the tests.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.redisbus-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,embedded,torchrl,safetensors]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/redisbus demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
