# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch is pinned first so pip takes the local 2.13.0 CPU wheel instead of a multi-GB CUDA build.
TORCH   := torch==2.13.0

.PHONY: demo test test-slow bench setup clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m mobilellm_r1.assets fetch
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mobilellm-r1 demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/tokenize.py

clean:
	rm -rf $(VENV) .cache
