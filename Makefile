# Sluice — the two commands of the README, and the rest.
#   make demo   a working gateway on this machine (creates .venv on first use)
#   make test   everything CI runs: lint, types, the test suite
#   make bench  the benchmark suite; results go to docs/benchmarks.md

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PORT   ?= 8080

.PHONY: demo test lint typecheck unit bench system-deps clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "creating $(VENV) …"; $(PYTHON) -m venv $(VENV); }
	@echo "installing sluice and its test tools into $(VENV) …"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@$(BIN)/python -m pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	@$(BIN)/sluice demo --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check sluice tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) system-deps lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# Debian packages the tests and benchmarks drive for real; installed only when missing.
system-deps:
	@scripts/ensure-system-deps.sh

bench: $(STAMP) system-deps
	@$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis data/demo
