"""``hf_cpu``: a verl rollout backend that generates with HF transformers on CPU.

Registered in verl's registries (no verl edit):
- ``RolloutReplicaRegistry["hf_cpu"]`` → :class:`HFCPUReplica` (driver side; starts one server actor per replica);
- ``_ROLLOUT_REGISTRY[("hf_cpu", "async")]`` → :class:`HFCPUWeightReceiver` (inside verl's hybrid actor worker;
  forwards the trainer's weights to the server on every ``checkpoint_manager.update_weights()``).

The server actor (:class:`HFCPURolloutServer`, named ``hf_cpu_rollout_server_<replica rank>``) exposes verl's
token-in/token-out ``generate(prompt_ids, sampling_params, request_id)`` like verl's vLLM server, including the
teacher contract of verl's distillation (``sampling_params["prompt_logprobs"]``: ``extra_fields`` ``prompt_ids`` /
``prompt_logprobs`` as verl's ``extract_prompt_logprobs`` fills them, :meth:`HFGenerator.prompt_logprobs`).
Requests that arrive within ``batch_wait_s`` of each other run as one left-padded batched ``generate`` in a worker
thread; a weight load takes the same lock, so no batch ever mixes two policies.

LoRA pushes load through peft (:mod:`recipe.atropos.cpu.hf_cpu_lora`); every load records a weight probe
(:meth:`HFGenerator.weight_probe`) that tests compare with the checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from verl.workers.rollout import base as rollout_base
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry, TokenOutput
from verl.workers.rollout.utils import ensure_async_iterator

from recipe.atropos.cpu.hf_cpu_lora import load_adapter, load_full, lora_shape, module_fingerprint, wrap_with_lora

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))  # verl's root config is WARNING; weight loads are news

ROLLOUT_NAME = "hf_cpu"


def server_actor_name(replica_rank: int) -> str:
    """The Ray actor name of a replica's server (``ray.get_actor(server_actor_name(0))``)."""
    return f"hf_cpu_rollout_server_{replica_rank}"


@dataclass(frozen=True)
class SamplingKey:
    """Requests with equal keys can share one batched ``generate``."""

    temperature: float
    top_p: float
    top_k: int


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    key: SamplingKey
    max_tokens: int
    want_logprobs: bool
    future: asyncio.Future | None = field(default=None, repr=False)


def sampling_key(sampling_params: dict[str, Any]) -> SamplingKey:
    temperature = sampling_params.get("temperature")
    top_p = sampling_params.get("top_p")
    top_k = sampling_params.get("top_k")
    return SamplingKey(
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        top_k=-1 if top_k is None else int(top_k),
    )


class HFGenerator:
    """Batched HF ``generate`` with per-token log-probs of the sampled tokens; the policy version counts loads."""

    def __init__(self, model_path: str, response_length: int, num_threads: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager")
        self.model.eval()
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids: list[int] = list(eos) if isinstance(eos, list | tuple) else [int(eos)]
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self.response_length = response_length
        self.policy_version = 0
        self.n_weight_updates = 0
        self.lora_config: dict[str, Any] | None = None  # the peft config the model is wrapped with (LoRA runs)
        self._probe: dict[str, float] = {}
        self._record_probe({})

    @property
    def hf_model(self) -> torch.nn.Module:
        """The transformers model inside the peft wrapper (the model itself without LoRA)."""
        return self.model.get_base_model() if self.lora_config is not None else self.model

    def load_weights(
        self,
        state_dict: dict[str, torch.Tensor],
        policy_version: int | None = None,
        peft_config: dict[str, Any] | None = None,
        base_sync_done: bool = True,
    ) -> None:
        """Load trained weights; ``policy_version`` defaults to the previous one + 1.

        ``peft_config`` None: full weights (HF parameter names; a full fine-tune, or LoRA merged by verl).
        ``peft_config`` set (verl's LoRA adapter sync): the model is wrapped with that LoRA config on first use; then
        ``base_sync_done=False`` loads base weights (``...base_layer.weight`` names accepted) and ``True`` the
        adapter tensors (``get_peft_model_state_dict`` names), all of which must arrive.
        """
        lora = peft_config is not None
        adapter = lora and base_sync_done  # the adapter tensors (else full, merged or LoRA base weights)
        if lora and self.lora_config is None:
            self.model = wrap_with_lora(self.model, peft_config)
            self.lora_config = dict(peft_config)
        elif lora and lora_shape(peft_config) != lora_shape(self.lora_config):
            raise ValueError(f"hf_cpu rollout: LoRA config changed mid-run: {self.lora_config} -> {peft_config}")
        if adapter:
            load_adapter(self.model, state_dict)
        else:
            load_full(self.hf_model, state_dict)
        self.n_weight_updates += 1
        self.policy_version = self.policy_version + 1 if policy_version is None else int(policy_version)
        self._record_probe(state_dict, adapter=adapter)
        logger.info(
            "hf_cpu rollout: policy version %d (%d weight loads; %s)",
            self.policy_version,
            self.n_weight_updates,
            "LoRA adapter" if adapter else "full/base weights",
        )

    def _record_probe(self, received: dict[str, torch.Tensor], adapter: bool = False) -> None:
        """Fingerprints of the weights this rollout now samples with: see :meth:`weight_probe`."""
        self._probe_module, module = module_fingerprint(self.model, self.hf_model)
        start = self._probe.get("start_module_weight_checksum")
        loaded = self.n_weight_updates > 0
        complete = adapter or self.lora_config is None  # a LoRA base sync alone is not yet the policy
        if start is None and loaded and complete:
            start = module["module_weight_checksum"]  # the first complete policy received (resumed: the checkpoint's)
        self._probe = {
            "weight_loads": float(self.n_weight_updates),
            "adapter_loads": self._probe.get("adapter_loads", 0.0) + (1.0 if adapter else 0.0),
            "received_tensors": float(len(received)),
            **module,
            **({} if start is None else {"start_module_weight_checksum": start}),
        }

    def weight_probe(self) -> dict[str, float]:
        """After the last load: loads so far, adapter loads, tensors received, and the probe module's fingerprint
        (:func:`~recipe.atropos.cpu.hf_cpu_lora.module_fingerprint`); ``start_module_weight_checksum`` is that weight
        checksum after the first complete update (the policy the run started from; after a LoRA base sync, once the
        adapter has arrived too)."""
        return dict(self._probe)

    @property
    def probe_module(self) -> str:
        """The HF module name (``model.layers.0.self_attn.q_proj``) the probe's module checksums are of."""
        return self._probe_module

    @torch.no_grad()
    def prompt_logprobs(self, prompt_ids: list[int], k: int) -> dict[str, list]:
        """One forward pass over ``prompt_ids`` [L], log-probs at temperature 1, in verl's teacher contract: row j is
        the distribution of token j + 1 (L - 1 rows, then a dummy row of zeros, as verl's
        ``extract_prompt_logprobs``): ``prompt_ids`` / ``prompt_logprobs`` [L][max(k, 1)] the top-k ranked (k = 0:
        the prompt token itself), and ``prompt_token_logprobs`` [L] the prompt token's own log-prob (the recipe's:
        vLLM's answer adds it where it is outside the top-k)."""
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        logits = self.model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # [L - 1, V]
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = ids[0, 1:]
        own = logprobs.gather(1, targets[:, None])  # [L - 1, 1]
        if k > 0:
            top = logprobs.topk(k, dim=-1)
            rank_ids, rank_lps = top.indices.tolist(), top.values.tolist()
        else:
            rank_ids, rank_lps = targets[:, None].tolist(), own.tolist()
        width = max(k, 1)
        return {
            "prompt_ids": [*rank_ids, [0] * width],
            "prompt_logprobs": [*rank_lps, [0.0] * width],
            "prompt_token_logprobs": [*own.squeeze(1).tolist(), 0.0],
        }

    @torch.no_grad()
    def generate_batch(
        self, prompts: list[list[int]], key: SamplingKey, max_tokens: list[int], want_logprobs: bool = True
    ) -> list[tuple[list[int], list[float]]]:
        """One left-padded batch → per prompt ``(token_ids [L_i], log_probs [L_i])``, cut at EOS and max_tokens.

        Log-probs are ``log_softmax(logits / temperature)`` at the sampled token (temperature 0 → 1.0), exactly what
        verl's actor recomputes for the same tokens.
        """
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(max_tokens),
            "eos_token_id": self.eos_ids,
            "pad_token_id": self.pad_id,
            "return_dict_in_generate": True,
            "output_logits": True,
        }
        if key.temperature > 0:
            kwargs.update(do_sample=True, temperature=key.temperature, top_p=key.top_p, top_k=max(key.top_k, 0))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        scale = key.temperature if key.temperature > 0 else 1.0
        logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float() / scale, dim=-1)  # [B, T_new, V]
        results = []
        for i in range(len(prompts)):
            seq = out.sequences[i, width:].tolist()
            end = next((j + 1 for j, t in enumerate(seq) if t in self.eos_ids), len(seq))
            seq = seq[: min(end, max_tokens[i])]
            lps = logprobs[i, torch.arange(len(seq)), torch.tensor(seq, dtype=torch.long)].tolist() if seq else []
            results.append((seq, lps if want_logprobs else []))
        return results


@ray.remote(num_cpus=0)
class HFCPURolloutServer:
    """Ray actor serving concurrent ``generate`` calls in micro-batches (see module docstring)."""

    def __init__(self, model_path: str, response_length: int) -> None:
        threads = int(os.environ.get("ATROPOS_CPU_THREADS", "0")) or os.cpu_count()
        self.generator = HFGenerator(model_path, response_length, num_threads=threads)
        self.batch_wait_s = float(os.environ.get("ATROPOS_HF_CPU_BATCH_WAIT_S", "0.05"))
        self.max_batch = int(os.environ.get("ATROPOS_HF_CPU_MAX_BATCH", "64"))
        self._queue: list[GenerationRequest] = []
        self._lock = asyncio.Lock()
        self._drainer: asyncio.Task | None = None
        self._stats = {"n_requests": 0, "n_batches": 0, "max_batch_seen": 0, "weight_load_s": 0.0}

    async def generate(
        self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str, **kwargs: Any
    ) -> TokenOutput:
        params = dict(sampling_params)
        prompt_rows: dict[str, list] = {}
        if params.get("prompt_logprobs") is not None:  # verl's teacher contract; the samples follow as usual
            async with self._lock:
                k = int(params["prompt_logprobs"])
                prompt_rows = await asyncio.to_thread(self.generator.prompt_logprobs, list(prompt_ids), k)
        max_tokens = params.get("max_tokens") or params.get("max_new_tokens") or self.generator.response_length
        request = GenerationRequest(
            prompt_ids=list(prompt_ids),
            key=sampling_key(params),
            max_tokens=max(1, min(int(max_tokens), self.generator.response_length)),
            want_logprobs=bool(params.get("logprobs", False)),
            future=asyncio.get_running_loop().create_future(),
        )
        self._queue.append(request)
        self._stats["n_requests"] += 1
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        token_ids, log_probs, version = await request.future
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs if request.want_logprobs else None,
            stop_reason="completed",
            extra_fields={"policy_version": version, **prompt_rows},
        )

    async def _drain(self) -> None:
        while self._queue:
            await asyncio.sleep(self.batch_wait_s)  # let concurrent requests join the batch
            async with self._lock:
                key = self._queue[0].key
                batch = [r for r in self._queue if r.key == key][: self.max_batch]
                self._queue = [r for r in self._queue if not any(r is b for b in batch)]
                self._stats["n_batches"] += 1
                self._stats["max_batch_seen"] = max(self._stats["max_batch_seen"], len(batch))
                try:
                    results = await asyncio.to_thread(
                        self.generator.generate_batch,
                        prompts=[r.prompt_ids for r in batch],
                        key=key,
                        max_tokens=[r.max_tokens for r in batch],
                        want_logprobs=True,
                    )
                except Exception as exc:  # every waiter gets the error; none is left hanging
                    logger.exception("hf_cpu batched generate failed for %d requests", len(batch))
                    for r in batch:
                        r.future.set_exception(exc)
                    continue
                version = self.generator.policy_version
                for r, (ids, lps) in zip(batch, results, strict=True):
                    r.future.set_result((ids, lps, version))

    async def load_weights(self, state_dict: dict[str, torch.Tensor], **how: Any) -> int:
        """:meth:`HFGenerator.load_weights` (``how``: its keywords) under the generation lock (no batch mixes two
        policies); the seconds the lock was held add up in ``weight_load_s`` (generation waits that long for a swap).
        Returns the policy version now served."""
        async with self._lock:
            start = time.monotonic()
            await asyncio.to_thread(self.generator.load_weights, state_dict, **how)
            self._stats["weight_load_s"] += time.monotonic() - start
            return self.generator.policy_version

    def stats(self) -> dict[str, float]:
        """Counters, the policy version, the weight probe (``probe_*``) and this process's resident memory
        (``rss_mb``), all numbers (step metrics ``rollout/<replica>/<key>``)."""
        import psutil

        return {
            **self._stats,
            "rss_mb": psutil.Process().memory_info().rss / 2**20,
            "n_weight_updates": self.generator.n_weight_updates,
            "policy_version": self.generator.policy_version,
            **{f"probe_{key}": value for key, value in self.generator.weight_probe().items()},
        }

    def weight_probe(self) -> dict[str, Any]:
        """The generator's probe with the probe module's name."""
        return {**self.generator.weight_probe(), "module": self.generator.probe_module}

    # verl's lifecycle calls: vLLM frees/restores GPU memory here; on CPU there is nothing to do.
    async def wake_up(self) -> None: ...
    async def sleep(self) -> None: ...
    async def clear_kv_cache(self) -> None: ...
    async def release_kv_cache(self) -> None: ...
    async def resume_kv_cache(self) -> None: ...
    async def abort_all_requests(self, reject_request: bool = False) -> None: ...
    async def resume_generation(self) -> None: ...
    async def start_profile(self, **kwargs: Any) -> None: ...
    async def stop_profile(self) -> None: ...


class HFCPUReplica(RolloutReplica):
    """One hf_cpu server per replica; it runs in its own process, outside the training workers."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def launch_servers(self) -> None:
        path = getattr(self.model_config, "local_path", None) or self.model_config.path
        name = server_actor_name(self.replica_rank)
        if self.is_teacher_model:  # verl's distillation teacher (its own model, never trained): its own name
            name = f"hf_cpu_teacher_server_{self.replica_rank}{self.name_suffix}"
        server = HFCPURolloutServer.options(name=name).remote(
            model_path=os.path.expanduser(path), response_length=self.config.response_length
        )
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"ray://{name}"


class HFCPUWeightReceiver(BaseRollout):
    """Sends each update (full weights, LoRA base weights or LoRA adapter, with verl's ``peft_config`` and
    ``base_sync_done``) to this replica's server. Lives in verl's hybrid ActorRolloutRefWorker (colocated: a generator
    of the actor's tensors) or, split, in the replica's ``CheckpointEngineWorker`` (an async generator of the tensors
    the checkpoint engine received; verl passes ``replica_rank``)."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, model_config, device_mesh)
        cfg = self.config
        world = cfg.tensor_model_parallel_size * cfg.data_parallel_size * cfg.pipeline_model_parallel_size
        rank = int(os.environ.get("RANK", 0))
        self.replica_rank = int(kwargs.get("replica_rank", rank // world))
        self.is_leader = rank % world == 0
        self.sleep_level = 2

    async def resume(self, tags: list[str]) -> None:
        return None

    async def release(self) -> None:
        return None

    async def update_weights(self, weights: Any, **kwargs: Any) -> None:
        state: dict[str, torch.Tensor] = {}
        async for name, tensor in ensure_async_iterator(weights):  # consumed on every rank: may all-gather shards
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            state[name] = tensor.detach().to("cpu").clone()
        if self.is_leader:
            server = ray.get_actor(server_actor_name(self.replica_rank))
            await server.load_weights.remote(
                state_dict=state,
                policy_version=kwargs.get("global_steps"),
                peft_config=kwargs.get("peft_config"),
                base_sync_done=bool(kwargs.get("base_sync_done", True)),
            )


rollout_base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = f"{__name__}.HFCPUWeightReceiver"
RolloutReplicaRegistry.register(ROLLOUT_NAME, lambda: HFCPUReplica)
