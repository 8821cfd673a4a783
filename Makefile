# attnprobe: set-up, demo and tests on a fresh machine (Python 3.10+, CPU).
#   make demo   set everything up, scan the bundled MiniLM-L6 on the sample corpus, write the report
#   make test   set everything up and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench

$(BIN)/attnprobe: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

setup: $(BIN)/attnprobe

demo: setup
	$(BIN)/attnprobe scan --out attnprobe-runs/demo --overwrite
	$(BIN)/attnprobe report attnprobe-runs/demo

test: setup
	$(BIN)/pytest

bench: setup
	$(BIN)/python bench/bench_scan.py
