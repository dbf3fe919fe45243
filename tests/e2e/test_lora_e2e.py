"""LoRA (``actor_rollout_ref.model.lora_rank > 0``) through the launcher with the hf_cpu rollout, every process real.

The pitfall this guards against (verl issue 7495): with LoRA, a weight push that carries only the frozen base
weights leaves the rollout sampling the initial policy, and nothing fails. Here the rollout server's weight probe
(``rollout/0/probe_*``, recorded after each step's push) is compared with the trainer's checkpoint of the same step:
the effective weight ``W + B·A·alpha/r`` of a LoRA-targeted projection that the rollout holds equals the one the actor
saved, and it changes every step. Then the run is resumed for two more steps by the command the launcher printed as it
finished (the resumed rollout starts from the checkpoint's adapter), and the final checkpoint's adapter, exported
with verl's model merger, loads with plain ``peft`` and changes the base model's logits.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipe.atropos.launcher.processes import tail
from recipe.atropos.metrics_file import read_metrics
from recipe.atropos.rundir import RunDir
from tests.helpers import checkpoint_state, printed_resume_command

pytestmark = pytest.mark.timeout(1200)

LORA = (
    "actor_rollout_ref.model.lora_rank=8",
    "actor_rollout_ref.model.lora_alpha=16",
    "actor_rollout_ref.model.target_modules=all-linear",
)
# 3 new tokens from the random tiny model: about half the replies are one word, so groups have mixed scores and every
# step has a gradient (with 16 tokens all score 0 and lora_B would stay exactly zero: nothing to see).
ENV_ARGS = "{env.ensure_scores_are_not_same:true,env.max_new_tokens:3}"
COMMON = (
    *LORA,
    "trainer.save_freq=1",
    "trainer.resume_mode=auto",
    "atropos.max_policy_lag=0",  # every trained group was sampled by the policy the previous push sent
    f"atropos.launcher.envs.0.args={ENV_ARGS}",
    f"atropos.launcher.envs.1.args={ENV_ARGS}",
)
N_TARGETED = 14  # the tiny model's 2 layers x (q, k, v, o, gate, up, down)
ALPHA_OVER_R = 16 / 8


def probe_module(state: dict[str, torch.Tensor]) -> str:
    """The rollout probe's module: the first LoRA-targeted layer in module order (the state dict keeps it)."""
    first = next(k for k in state if ".lora_A." in k)
    return first.removeprefix("base_model.model.").split(".lora_A.")[0]


def effective_weight(state: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """``W + B·A·alpha/r`` in float64 from the actor's checkpoint, computed here by hand."""
    prefix = f"base_model.model.{module}"
    w = state[f"{prefix}.base_layer.weight"].to(torch.float64)
    a = state[f"{prefix}.lora_A.default.weight"].to(torch.float64)
    b = state[f"{prefix}.lora_B.default.weight"].to(torch.float64)
    return w + (b @ a) * ALPHA_OVER_R


def export_adapter(run_dir: Path, step: int, out: Path) -> Path:
    """verl's own export: ``python -m verl.model_merger merge --backend fsdp`` writes ``<out>/lora_adapter``."""
    actor = RunDir(run_dir).checkpoints / f"global_step_{step}" / "actor"
    cmd = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp"]
    subprocess.run([*cmd, "--local_dir", str(actor), "--target_dir", str(out)], check=True, capture_output=True)
    return out / "lora_adapter"


def test_lora_pushes_reach_the_rollout_checkpoint_resume_and_plain_peft(
    launch, tiny_model: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # ---- a 2-step run, a checkpoint after each step ------------------------------------------------------------
    run = launch(*COMMON, "trainer.total_training_steps=2")
    code = run.wait_exit(600)
    trainer_log = RunDir(run.run_dir).trainer_log
    assert code == 0, tail(run.log, 40) + "\n--- trainer ---\n" + tail(trainer_log, 60)
    rows = read_metrics(RunDir(run.run_dir).metrics_file)
    assert [r["step"] for r in rows] == [1, 2]

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    module = probe_module(checkpoint_state(run.run_dir, 1))
    base_checksum = float(base.get_submodule(module).weight.detach().to(torch.float64).sum())
    seen = [base_checksum]
    for row in rows:
        step = int(row["step"])
        assert row["atropos/policy_version"] == row["rollout/0/policy_version"] == step
        assert row["atropos/policy_lag_max"] == 0
        # one adapter push at start-up (after verl's base sync: rollout.load_format is dummy) and one per step
        assert row["rollout/0/probe_adapter_loads"] == step + 1
        assert row["rollout/0/probe_received_tensors"] == 2 * N_TARGETED  # lora_A and lora_B only
        assert row["rollout/0/probe_lora_modules"] == N_TARGETED
        assert row["rollout/0/probe_lora_delta_norm"] > 0  # the trained adapter, not the frozen base
        # the run started from the base model (lora_B is zero at initialisation)
        assert row["rollout/0/probe_start_module_weight_checksum"] == pytest.approx(base_checksum, abs=1e-9)
        # what the rollout now samples with is what the actor checkpointed at this step
        expected = float(effective_weight(checkpoint_state(run.run_dir, step), module).sum())
        assert row["rollout/0/probe_module_weight_checksum"] == pytest.approx(expected, abs=1e-9)
        seen.append(row["rollout/0/probe_module_weight_checksum"])
        assert row["atropos/rollout_logprob_diff_max"] < 0.05  # rollout and actor compute the same policy
    assert len(set(seen)) == len(seen)  # every push changed the rollout's weights
    meta = json.loads(
        (RunDir(run.run_dir).checkpoints / "global_step_2" / "actor" / "lora_train_meta.json").read_text()
    )
    assert meta["r"] == 8 and meta["lora_alpha"] == 16

    # ---- resume to step 4 with the command the launcher printed as it finished ------------------------------------
    head, command = printed_resume_command(run.log_text())
    assert head == "finished: checkpoint 2 of trainer.total_training_steps=2; to train on to step 4"
    resumed = launch(argv=command, log=tmp_path / "launcher_resumed.log")
    code = resumed.wait_exit(600)
    assert code == 0, tail(resumed.log, 40) + "\n--- trainer ---\n" + tail(trainer_log, 60)
    rows = read_metrics(RunDir(run.run_dir).metrics_file)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # a fresh rollout server: its first complete policy was the step-2 checkpoint's adapter, then one push a step
    for row in rows[2:]:
        step = int(row["step"])
        assert row["rollout/0/probe_adapter_loads"] == step - 1
        assert row["rollout/0/probe_start_module_weight_checksum"] == pytest.approx(seen[2], abs=1e-9)
        expected = float(effective_weight(checkpoint_state(run.run_dir, step), module).sum())
        assert row["rollout/0/probe_module_weight_checksum"] == pytest.approx(expected, abs=1e-9)
        assert expected not in seen
        seen.append(expected)
    last = rows[-1]

    # ---- the final adapter outside verl: plain peft -------------------------------------------------------------
    adapter_dir = export_adapter(run.run_dir, 4, tmp_path / "export")
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_model.safetensors").exists()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        fresh_base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(fresh_base, adapter_dir).eval()
        adapted_logits = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
    assert (adapted_logits - base_logits).abs().max() > 1e-6
    merged_checksum = float(merged.get_submodule(module).weight.detach().to(torch.float64).sum())
    # the adapter peft loads is the one the rollout sampled with after the last push (fp32 merge vs float64)
    assert merged_checksum == pytest.approx(last["rollout/0/probe_module_weight_checksum"], abs=1e-4)


HAS_VLLM = importlib.util.find_spec("vllm") is not None


def adapter_sums(state: dict[str, torch.Tensor]) -> tuple[float, float, int]:
    """(Σ lora_A, Σ lora_B, tensors) over the actor checkpoint's adapter, float64."""
    a = sum(float(v.to(torch.float64).sum()) for k, v in state.items() if ".lora_A." in k)
    b = sum(float(v.to(torch.float64).sum()) for k, v in state.items() if ".lora_B." in k)
    return a, b, sum(1 for k in state if ".lora_" in k)


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM's CPU build (make vllm-env)")
def test_lora_adapter_reaches_vllms_lora_layers_every_step(launch) -> None:
    """verl's vLLM replica on vLLM's CPU build: the adapter goes through verl's ``add_lora`` path into vLLM's LoRA
    layers (PunicaWrapperCPU) every step, and every generate carries it."""
    run = launch(*COMMON, "trainer.total_training_steps=2", "atropos.cpu_rollout=vllm")
    code = run.wait_exit(840)
    trainer_log = RunDir(run.run_dir).trainer_log
    assert code == 0, tail(run.log, 40) + "\n--- trainer ---\n" + tail(trainer_log, 60)
    rows = read_metrics(RunDir(run.run_dir).metrics_file)
    assert [r["step"] for r in rows] == [1, 2]
    b_sums = []
    for row in rows:
        step = int(row["step"])
        assert row["atropos/policy_version"] == row["rollout/0/policy_version"] == step
        # load_format=auto: vLLM loaded the base from disk, so every sync (start-up + one per step) is an adapter
        assert row["rollout/0/weight_syncs"] == row["rollout/0/probe_adapter_syncs"] == step + 1
        assert row["rollout/0/probe_loaded_loras"] == 1
        a_sum, b_sum, n_tensors = adapter_sums(checkpoint_state(run.run_dir, step))
        assert row["rollout/0/probe_received_tensors"] == n_tensors == 2 * N_TARGETED
        # what vLLM's LoRA layers hold is this step's checkpointed adapter (vLLM folds alpha/r into B)
        assert row["rollout/0/probe_lora_a_checksum"] == pytest.approx(a_sum, rel=1e-6, abs=1e-6)
        assert row["rollout/0/probe_lora_b_checksum"] == pytest.approx(ALPHA_OVER_R * b_sum, rel=1e-6, abs=1e-6)
        assert b_sum != 0.0  # trained: lora_B starts at zero
        b_sums.append(b_sum)
        # every completion was generated with the adapter attached, none during an update
        assert row["rollout/0/generates_with_lora"] == row["rollout/0/generates"] > 0
        assert row["rollout/0/generates_in_update_windows"] == 0
        assert row["atropos/rollout_logprob_diff_max"] < 0.05
    assert len(set(b_sums)) == len(b_sums)  # the adapter changed every step
