# `make test` and `make demo` each create or refresh .venv from the pinned requirements first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast demo bench reproduce clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not distributed"

demo: $(STAMP)
	$(BIN)/lorkd demo --out runs/demo --overwrite

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py --out runs/bench.json

# every published number (benchmarks/reproduce.py); e.g. make reproduce ARGS="--only medmnist --device cuda"
reproduce: $(STAMP)
	$(BIN)/python benchmarks/reproduce.py --out runs/reproduce $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
