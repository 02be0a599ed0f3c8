# Two commands for a fresh machine: `make demo` and `make test`. Both create the virtualenv when it is missing.
PYTHON ?= python3
VENV ?= .venv
HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
DEPS := $(VENV)/.deps-$(HASH)
# The editable install records this checkout's path, so a venv shared between clones (CI's cache) is re-linked.
LINK := .linked-$(HASH)
# The benchmarks' extra (matplotlib) goes in only for `make bench*`: `make test` does not need it.
BENCH := $(VENV)/.bench-$(HASH)
BIN := $(VENV)/bin

.PHONY: demo test sim install clean bench bench-quick

install: $(LINK)

$(DEPS):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

$(LINK): $(DEPS)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

demo: $(LINK)
	$(BIN)/lte-demo --config configs/digits.yaml --peers 3 --rounds 30

test: $(LINK)
	$(BIN)/python -m pytest -q

$(BENCH): $(LINK)
	$(BIN)/python -m pip install -q -e '.[bench]'
	@touch $@

# All benchmarks on CPU (under 30 minutes on 2 idle cores, see docs/benchmarks.md "Run time"); results/bench/.
bench: $(BENCH)
	$(BIN)/python benchmarks/run.py

# The same with fewer steps and seeds (under 5 minutes); its numbers are labelled QUICK.
bench-quick: $(BENCH)
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf $(VENV) .linked-* runs results
