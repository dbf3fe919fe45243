"""``vllm_cpu``: verl's own vLLM rollout (replica, HTTP server, weight sync) on vLLM's CPU build.

Selected on the CPU runtime with ``atropos.cpu_rollout: vllm`` (needs ``.venv-vllm``, see ``make vllm-env``); this
module imports vLLM, so only that choice imports it (``VERL_USE_EXTERNAL_MODULES``). Everything is verl's
``vLLMReplica`` / ``vLLMHttpServer`` / ``ServerAdapter`` / bucketed weight transfer except three overrides:

- :class:`CPUWorkerExtension` (vLLM's ``worker_extension_cls``, named by :meth:`VLLMCPUHttpServer.
  _get_worker_extension_cls`): on CPU, vLLM bakes every linear layer's weight into a oneDNN handle after loading and
  replaces ``layer.weight`` with an empty Parameter without ``weight_loader``
  (``vllm/model_executor/layers/linear.py:215`` → ``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``), so
  verl's ``model.load_weights`` cannot load a second time. The extension wraps verl's weight load in vLLM 0.24's own
  in-place reload (``vllm.model_executor.model_loader.reload``: ``initialize_layerwise_reload`` restores each
  layer's parameters from the metadata vLLM recorded at model creation, each layer is re-processed — the oneDNN
  handle rebuilt — once all its weights arrived, ``finalize_layerwise_reload`` does the rest), then rebuilds the
  tied LM head's handle (:func:`refresh_tied_cpu_gemms`). A LoRA adapter sync (``lora_rank > 0``, verl's default
  ``lora.merge=false``) goes through verl's own adapter path (``add_lora`` of a ``TensorLoRARequest``; vLLM's CPU
  build runs LoRA with its ``PunicaWrapperCPU``), the base weights untouched: the CPU runtime sets
  ``rollout.load_format=auto`` then, so vLLM loads the base from disk and verl never sends it. It also keeps a
  weight probe (a checksum of the received tensors and of the loaded embedding, or of the adapter vLLM's LoRA layers
  hold) for tests.
- :class:`VLLMCPUHttpServer`: names that extension, sets vLLM's CPU environment (KV cache size, thread binding),
  refuses sleep mode (vLLM's CPU platform has none) and counts, for tests and metrics
  (:meth:`VLLMCPUHttpServer.stats`), the requests still unfinished in the engine whenever a weight sync starts or
  ends and the generate calls that reached the engine between the trainer's ``sleep_replicas`` and the sync's end.
- :class:`VLLMCPUReplica`: starts that server under the actor name verl's ``ServerAdapter`` looks up
  (``vllm_cpu_server_<replica>_<node>``, from ``rollout.name``).

Registered in verl's registries (no verl edit): ``RolloutReplicaRegistry["vllm_cpu"]`` and
``_ROLLOUT_REGISTRY[("vllm_cpu", "async")]`` → verl's own ``ServerAdapter``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ray
import torch
from verl.workers.rollout import base as rollout_base
from verl.workers.rollout.replica import RolloutReplicaRegistry
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

ROLLOUT_NAME = "vllm_cpu"
WEIGHT_SYNC_METHOD = "update_weights_from_ipc"

# vLLM's CPU settings, set in the server actor before vLLM starts (its worker processes inherit them); a value
# already in the environment wins.
VLLM_CPU_ENV: dict[str, str] = {
    # GiB of KV cache (vLLM's CPU default is 4 GiB); a tiny model with short sequences needs far less.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # Do not pin OpenMP threads to cores: the trainer's processes share the same cores.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


def weight_checksum(tensors: list[tuple[str, torch.Tensor]]) -> float:
    """Sum of every element of ``tensors`` (each any shape) in float64: a cheap fingerprint of one weight sync."""
    return float(sum(t.detach().to(torch.float64).sum().item() for _, t in tensors))


def refresh_tied_cpu_gemms(model: torch.nn.Module) -> int:
    """Rebuild the CPU GEMM handle of every unquantized embedding / LM head from its current weight; returns count.

    The layerwise reload processes a tied weight through one owner only (its documented limitation 2): with
    ``tie_word_embeddings`` the LM head shares ``embed_tokens.weight`` but is never re-processed, so its oneDNN
    handle — a packed copy made at start-up — would keep the start-up (dummy) weights. Embedding layers keep their
    weight (``remove_weight=False``), so re-dispatching them is safe and idempotent.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    refreshed = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, UnquantizedEmbeddingMethod):
            method.process_weights_after_loading(module)
            refreshed += 1
    return refreshed


def lora_slot_checksums(model: torch.nn.Module) -> tuple[float, float, int]:
    """(sum of every LoRA layer's A slots, sum of its B slots, LoRA layers) of a vLLM model, float64.

    vLLM copies an active adapter into each LoRA layer's ``lora_a_stacked`` / ``lora_b_stacked`` (zeroed slots
    otherwise; packed layers such as ``qkv_proj`` keep one tensor per slice) with the scaling ``alpha/r`` folded into B
    (``LoRALayerWeights.optimize``): with one adapter loaded the sums are ``Σ A`` and ``alpha/r · Σ B`` over the
    adapter's tensors, which tests compare with the trainer's checkpoint.
    """
    a_sum = b_sum = 0.0
    modules = 0
    for module in model.modules():
        a_stacked = getattr(module, "lora_a_stacked", None)
        b_stacked = getattr(module, "lora_b_stacked", None)
        if a_stacked is None or b_stacked is None:
            continue
        modules += 1
        a_sum += sum(float(t.detach().to(torch.float64).sum()) for t in a_stacked)
        b_sum += sum(float(t.detach().to(torch.float64).sum()) for t in b_stacked)
    return a_sum, b_sum, modules


class CPUWorkerExtension(vLLMColocateWorkerExtension):
    """verl's colocate worker extension whose full-weight sync reloads in place on vLLM's CPU backend."""

    def update_weights_from_ipc(
        self, peft_config: dict | None = None, base_sync_done: bool = False, use_shm: bool = False
    ) -> None:
        """Receive verl's bucketed weights (shared memory on CPU) and load them with vLLM's layerwise reload."""
        from verl.utils.vllm.vllm_quant_utils import is_quantized_model
        from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        if peft_config and base_sync_done:
            self._update_adapter_from_ipc(peft_config, use_shm)
            return
        if peft_config:
            raise NotImplementedError(
                "rollout vllm_cpu: LoRA base-weight syncs (rollout.load_format=dummy) are not supported (the in-place "
                "reload on vLLM's CPU backend is untested with LoRA-wrapped layers); set "
                "actor_rollout_ref.rollout.load_format=auto (the CPU runtime does this for LoRA with "
                "atropos.cpu_rollout=vllm) so vLLM loads the base from disk and verl sends adapters only"
            )
        if is_quantized_model(self.model_runner.vllm_config):
            raise NotImplementedError(
                "rollout vllm_cpu: quantized rollout models are not supported on vLLM's CPU backend; "
                "unset actor_rollout_ref.rollout.quantization or use a GPU"
            )
        if self.device is None:
            self.device = torch.device("cpu")
        model = self.model_runner.model
        initialize_layerwise_reload(model)
        received = {"tensors": 0, "checksum": 0.0}

        def on_bucket(weights: list[tuple[str, torch.Tensor]], is_last: bool) -> None:
            # The receiver reuses its shared-memory buffer for the next bucket, while the layerwise reload keeps
            # a layer's tensors until all of them arrived: load copies.
            weights = [(name, tensor.clone()) for name, tensor in weights]
            received["tensors"] += len(weights)
            received["checksum"] += weight_checksum(weights)
            self._update_weights(weights, peft_config=None, base_sync_done=False)

        BucketedWeightReceiver(zmq_handle=self._get_zmq_handle(), device=self.device, use_shm=use_shm).receive_weights(
            on_bucket_received=on_bucket
        )
        finalize_layerwise_reload(model, self.model_runner.vllm_config.model_config)
        refresh_tied_cpu_gemms(model)
        self._probe = {
            "weight_syncs": getattr(self, "_probe", {}).get("weight_syncs", 0) + 1,
            "received_tensors": received["tensors"],
            "received_checksum": received["checksum"],
            "embedding_checksum": weight_checksum(
                [(n, p) for n, p in model.named_parameters() if n.endswith("embed_tokens.weight")]
            ),
        }
        logger.info("vllm_cpu worker: weight sync %s", self._probe)

    def _update_adapter_from_ipc(self, peft_config: dict, use_shm: bool) -> None:
        """A LoRA adapter sync: verl's own path (remove the old adapter, receive the new tensors, ``add_lora`` a
        ``TensorLoRARequest``); vLLM's base weights are not touched. Then probe what vLLM's LoRA layers hold."""
        received = {"tensors": 0, "checksum": 0.0}
        self._adapter_received = received
        super().update_weights_from_ipc(peft_config=peft_config, base_sync_done=True, use_shm=use_shm)
        a_sum, b_sum, modules = lora_slot_checksums(self.model_runner.model)
        previous = getattr(self, "_probe", {})
        self._probe = {
            "weight_syncs": previous.get("weight_syncs", 0) + 1,
            "adapter_syncs": previous.get("adapter_syncs", 0) + 1,
            "received_tensors": received["tensors"],
            "received_checksum": received["checksum"],
            "loaded_loras": len(self.list_loras()),
            "lora_modules": modules,
            "lora_a_checksum": a_sum,
            "lora_b_checksum": b_sum,
        }
        logger.info("vllm_cpu worker: adapter sync %s", self._probe)

    def _update_weights(self, weights: Any, peft_config: dict, base_sync_done: bool) -> None:
        received = getattr(self, "_adapter_received", None)
        if peft_config and base_sync_done and received is not None:
            tensors = list(weights)
            received["tensors"] += len(tensors)
            received["checksum"] += weight_checksum(tensors)
            weights = tensors
        super()._update_weights(weights, peft_config=peft_config, base_sync_done=base_sync_done)

    def weight_probe(self) -> dict[str, float]:
        """The last sync's probe: count, received tensors and their checksum, and either the checksum of the loaded
        embedding (full weights) or, for a LoRA adapter, the loaded adapters and the checksums of what vLLM's LoRA
        layers hold (:func:`lora_slot_checksums`)."""
        return dict(getattr(self, "_probe", {"weight_syncs": 0}))


class VLLMCPUHttpServer(vLLMHttpServer):
    """verl's vLLM HTTP server with the CPU worker extension, CPU environment and weight-sync bookkeeping."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for key, value in VLLM_CPU_ENV.items():
            os.environ.setdefault(key, value)
        self._sync_stats = {
            "weight_syncs": 0,
            "unfinished_at_sync_start": 0,
            "unfinished_at_sync_end": 0,
            "generates": 0,  # engine.generate calls (the ray backend's and vLLM's HTTP API's alike)
            "generates_in_update_windows": 0,  # of those, started between the trainer's sleep and the sync's end
            "generates_with_lora": 0,  # of those, with a LoRA adapter attached
        }
        self._generates_at_sleep: int | None = None
        super().__init__(*args, **kwargs)

    def _validate_configs(self) -> None:
        if self.config.enable_sleep_mode or self.config.free_cache_engine:
            raise ValueError(
                "rollout vllm_cpu: vLLM's CPU platform has no sleep mode; set "
                "actor_rollout_ref.rollout.enable_sleep_mode=false and actor_rollout_ref.rollout.free_cache_engine="
                "false (the CPU runtime does this when atropos.cpu_rollout=vllm)"
            )
        super()._validate_configs()

    async def launch_server(self, *args: Any, **kwargs: Any) -> None:
        start = time.monotonic()
        await super().launch_server(*args, **kwargs)
        self._sync_stats["startup_s"] = round(time.monotonic() - start, 2)
        self._count_engine_generates()
        logger.info("vllm_cpu server (replica %d) started vLLM in %.1f s", self.replica_rank, time.monotonic() - start)

    def _get_worker_extension_cls(self) -> str:
        return f"{CPUWorkerExtension.__module__}.{CPUWorkerExtension.__qualname__}"

    def _count_engine_generates(self) -> None:
        """Count every ``engine.generate`` call: verl's ``generate`` and vLLM's OpenAI server both call it."""
        generate = self.engine.generate

        def counted_generate(*args: Any, **kwargs: Any) -> Any:
            self._sync_stats["generates"] += 1
            if kwargs.get("lora_request") is not None:  # verl's generate attaches the adapter once one is loaded
                self._sync_stats["generates_with_lora"] += 1
            return generate(*args, **kwargs)

        self.engine.generate = counted_generate

    async def sleep(self) -> None:
        """The trainer's update window starts here (verl's ``sleep_replicas``, after the endpoint paused)."""
        self._generates_at_sleep = self._sync_stats["generates"]
        await super().sleep()

    def _unfinished_requests(self) -> int:
        return int(self.engine.output_processor.get_num_unfinished_requests())

    async def collective_rpc(
        self, method: Any, timeout: float | None = None, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        """verl's ``ServerAdapter`` drives weight syncs through here: count requests the engine still holds."""
        if method != WEIGHT_SYNC_METHOD:
            return await super().collective_rpc(method, timeout=timeout, args=args, kwargs=kwargs)
        self._sync_stats["unfinished_at_sync_start"] += self._unfinished_requests()
        await super().collective_rpc(method, timeout=timeout, args=args, kwargs=kwargs)
        self._sync_stats["unfinished_at_sync_end"] += self._unfinished_requests()
        self._sync_stats["weight_syncs"] += 1
        if self._generates_at_sleep is not None:
            self._sync_stats["generates_in_update_windows"] += self._sync_stats["generates"] - self._generates_at_sleep
            self._generates_at_sleep = None

    async def stats(self) -> dict[str, float]:
        """vLLM start-up seconds, weight syncs seen here, requests in flight during them (must be 0), the policy
        version, and the worker's weight probe."""
        probes = await self.engine.collective_rpc("weight_probe")
        probe = probes[0] if probes else {}
        return {
            **self._sync_stats,
            "policy_version": -1 if self.global_steps is None else int(self.global_steps),
            **{f"probe_{key}": float(value) for key, value in probe.items()},
        }


class VLLMCPUReplica(vLLMReplica):
    """verl's vLLM replica whose server actor is :class:`VLLMCPUHttpServer`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(VLLMCPUHttpServer)

    def _get_server_name_prefix(self) -> str:
        # verl's ServerAdapter finds the server as f"{rollout.name}_server_<replica>_<node>".
        return f"{ROLLOUT_NAME}_"


rollout_base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = "verl.workers.rollout.vllm_rollout.ServerAdapter"
RolloutReplicaRegistry.register(ROLLOUT_NAME, lambda: VLLMCPUReplica)
