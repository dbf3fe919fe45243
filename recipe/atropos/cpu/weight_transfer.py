"""``gloo``: a verl checkpoint engine that streams the actor's weights to standalone rollout replicas over Gloo.

verl moves weights to rollout replicas on their own resources (``actor_rollout_ref.hybrid_engine=false``) through a
checkpoint engine (``verl/checkpoint_engine/``: ``nccl``, ``nixl``, ``hccl``, ``kimi``, ``mooncake``); every one of them
needs a GPU or RDMA stack (``nccl_checkpoint_engine.py`` imports cupy and copies buckets into CUDA memory). This one
is the same protocol on CPU tensors: actor rank 0 broadcasts buckets of weights to every rollout worker in a Gloo
process group of its own (a ``TCPStore`` at actor rank 0's node address, built per update and torn down after it, so
it never touches the actor's FSDP group). Other actor ranks take rank -1 and only walk the weight generator (producing
each full tensor is collective over the actor group).

Selected with ``actor_rollout_ref.rollout.checkpoint_engine.backend=gloo`` and
``checkpoint_engine.custom_backend_module=recipe.atropos.cpu.weight_transfer`` (verl imports that module in the
actor workers and the rollout's ``CheckpointEngineWorker`` before building the engine); the CPU runtime sets both when
the rollout is split (:func:`recipe.atropos.setup.placement.apply_split_cpu_settings`).

Per bucket the root sends a header ``[metadata bytes, bucket bytes, is_last]`` (int64 [3]), the pickled
:class:`~verl.checkpoint_engine.base.TensorMeta` list (uint8) and the bucket (uint8); tensors larger than a bucket
travel in chunks (verl's ``split_weight_chunks`` / ``merge_weight_chunks``).
"""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray
import torch
from torch._C._distributed_c10d import BroadcastOptions, ProcessGroupGloo
from torch.distributed import TCPStore
from verl.checkpoint_engine.base import (
    CheckpointEngine,
    CheckpointEngineRegistry,
    TensorMeta,
    merge_weight_chunks,
    split_weight_chunks,
)
from verl.utils.net_utils import get_free_port

from recipe.atropos.setup.weight_sync import GLOO_BACKEND as BACKEND

ALIGN = 16  # bytes: every tensor starts at a multiple of this within a bucket


@dataclass(frozen=True)
class Root:
    """Where the broadcast root (actor rank 0) listens: its TCPStore."""

    host: str
    port: int


def _broadcast(group: ProcessGroupGloo, tensor: torch.Tensor) -> torch.Tensor:
    options = BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()
    return tensor


@CheckpointEngineRegistry.register(BACKEND)
class GlooCheckpointEngine(CheckpointEngine):
    """Bucketed broadcast from actor rank 0 to the rollout workers over a per-update Gloo group.

    Args:
        bucket_size: bytes per bucket (``checkpoint_engine.update_weights_bucket_megabytes``).
        is_master: True in actor rank 0 (verl passes it to the actor side only).
        timeout_s: how long a rank waits for the others (store connect and each broadcast).
    """

    def __init__(self, bucket_size: int, is_master: bool = False, timeout_s: float = 600.0) -> None:
        self.bucket_size = int(bucket_size)
        self.is_master = is_master
        self.timeout = timedelta(seconds=timeout_s)
        self.rank: int | None = None
        self.group: ProcessGroupGloo | None = None
        self._store: TCPStore | None = None
        self.last_send: dict[str, float] = {}

    # ---- topology (verl's CheckpointEngineManager drives these) --------------------------------------------------
    def prepare(self) -> Root | None:
        if not self.is_master:
            return None
        host = ray.util.get_node_ip_address().strip("[]")
        return Root(host, get_free_port(host)[0])

    @classmethod
    def build_topology(
        cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[Any]
    ) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        root = metadata[0]
        if not isinstance(root, Root):
            raise RuntimeError("gloo checkpoint engine: actor rank 0 did not report its address (is_master unset?)")
        world = 1 + rollout_world_size
        actor = {"rank": [0] + [-1] * (actor_wg_world_size - 1), "world_size": [world] * actor_wg_world_size}
        rollout = {"rank": list(range(1, world)), "world_size": [world] * rollout_world_size}
        actor["root"] = [root] * actor_wg_world_size
        rollout["root"] = [root] * rollout_world_size
        return actor, rollout

    def init_process_group(self, rank: int, world_size: int, root: Root) -> None:
        self.rank = rank
        if rank < 0:
            return
        self._store = TCPStore(root.host, root.port, world_size, rank == 0, self.timeout)
        self.group = ProcessGroupGloo(self._store, rank, world_size, self.timeout)

    def finalize(self) -> None:
        self.group = None
        self._store = None
        self.rank = None

    # ---- transfer -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    async def send_weights(
        self, weights: Generator[tuple[str, torch.Tensor], None, None], global_steps: int | None = None
    ) -> dict[str, float]:
        if self.rank is None or self.rank > 0:
            raise RuntimeError(f"gloo checkpoint engine: rank {self.rank} cannot send (only actor rank 0 does)")
        if self.rank < 0:
            for _ in weights:  # producing each full tensor is collective over the actor ranks
                pass
            return {}
        start, sent = time.monotonic(), 0
        metas: list[TensorMeta] = []
        chunks: list[torch.Tensor] = []
        offset = 0

        async def flush(is_last: bool) -> None:
            nonlocal metas, chunks, offset, sent
            bucket = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
            await asyncio.to_thread(self._send_bucket, metas, bucket, is_last)
            sent += bucket.numel()
            metas, chunks, offset = [], [], 0

        async for meta, chunk in split_weight_chunks(_on_cpu(weights), self.bucket_size):
            if offset + meta.chunk_size > self.bucket_size and chunks:
                await flush(is_last=False)
            meta.offset = offset
            metas.append(meta)
            chunks.append(chunk.contiguous())
            offset += meta.chunk_size
            if pad := -offset % ALIGN:  # the next tensor starts aligned, so the receiver can view its dtype in place
                chunks.append(torch.zeros(pad, dtype=torch.uint8))
                offset += pad
        await flush(is_last=True)
        seconds = time.monotonic() - start
        self.last_send = {"seconds": seconds, "bytes": float(sent)}
        return {"atropos/weight_sync/send_s": seconds, "atropos/weight_sync/megabytes": sent / 2**20}

    def _send_bucket(self, metas: list[TensorMeta], bucket: torch.Tensor, is_last: bool) -> None:
        header_bytes = torch.frombuffer(bytearray(pickle.dumps(metas)), dtype=torch.uint8)
        _broadcast(self.group, torch.tensor([header_bytes.numel(), bucket.numel(), int(is_last)], dtype=torch.int64))
        _broadcast(self.group, header_bytes)
        if bucket.numel():
            _broadcast(self.group, bucket)

    def _receive_bucket(self) -> tuple[list[TensorMeta], torch.Tensor, bool]:
        header = _broadcast(self.group, torch.zeros(3, dtype=torch.int64))
        meta_len, bucket_len, is_last = (int(x) for x in header.tolist())
        metas = pickle.loads(_broadcast(self.group, torch.empty(meta_len, dtype=torch.uint8)).numpy().tobytes())
        bucket = torch.empty(bucket_len, dtype=torch.uint8)
        if bucket_len:
            _broadcast(self.group, bucket)
        return metas, bucket, bool(is_last)

    async def receive_weights(self, global_steps: int | None = None) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        if self.rank is None or self.rank < 1:
            raise RuntimeError(f"gloo checkpoint engine: rank {self.rank} cannot receive (rollout ranks are >= 1)")

        async def chunks() -> AsyncGenerator[tuple[TensorMeta, torch.Tensor], None]:
            while True:
                metas, bucket, is_last = await asyncio.to_thread(self._receive_bucket)
                for meta in metas:
                    yield meta, bucket[meta.offset : meta.offset + meta.chunk_size]
                if is_last:
                    return

        async for name, tensor in merge_weight_chunks(chunks(), self.bucket_size):
            yield name, tensor


async def _on_cpu(
    weights: Generator[tuple[str, torch.Tensor], None, None],
) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
    """The actor's (name, tensor) stream as contiguous CPU tensors (FSDP DTensors gathered whole)."""
    for name, tensor in weights:
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name, tensor.detach().to("cpu").contiguous()
