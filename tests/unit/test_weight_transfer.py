"""The recipe's ``gloo`` checkpoint engine: a real Gloo group between a sender (actor rank 0), an actor rank that only
walks its weights, and two receivers (rollout workers), each on its own thread and event loop."""

from __future__ import annotations

import asyncio
import importlib
import socket
import threading

import pytest
import torch
from verl.checkpoint_engine import CheckpointEngineRegistry

from recipe.atropos.cpu.weight_transfer import GlooCheckpointEngine, Root
from recipe.atropos.setup.weight_sync import GLOO_BACKEND, GLOO_MODULE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(7, 5, generator=g),  # 140 bytes: the next tensor would start unaligned
        "odd.bf16": torch.randn(3, generator=g).to(torch.bfloat16),  # 6 bytes
        "big.weight": torch.randn(64, 33, generator=g),  # 8448 bytes > the 4 KiB bucket: sent in chunks
        "ids": torch.arange(5, dtype=torch.int64),
        "last.bias": torch.randn(4, generator=g),
    }


def test_module_registers_the_backend_verl_looks_up() -> None:
    importlib.import_module(GLOO_MODULE)
    assert CheckpointEngineRegistry.get(GLOO_BACKEND) is GlooCheckpointEngine


@pytest.mark.parametrize("bucket_bytes", [4096, 1 << 20])
def test_broadcast_delivers_every_tensor_exactly(bucket_bytes: int) -> None:
    sent = weights()
    actors = [GlooCheckpointEngine(bucket_bytes, is_master=True), GlooCheckpointEngine(bucket_bytes)]
    rollouts = [GlooCheckpointEngine(bucket_bytes), GlooCheckpointEngine(bucket_bytes)]
    root = Root("127.0.0.1", free_port())
    assert actors[1].prepare() is None  # only the master reports an address
    actor_kwargs, rollout_kwargs = GlooCheckpointEngine.build_topology(2, 2, [root, None, None, None])
    assert actor_kwargs["rank"] == [0, -1] and rollout_kwargs["rank"] == [1, 2]
    assert actor_kwargs["world_size"] == [3, 3] and rollout_kwargs["world_size"] == [3, 3]

    received: dict[int, dict[str, torch.Tensor]] = {}
    walked: list[str] = []
    errors: list[BaseException] = []
    metrics: dict[str, float] = {}

    def walk(names: list[str]):
        for name, tensor in sent.items():
            names.append(name)
            yield name, tensor

    async def receive(engine: GlooCheckpointEngine, i: int) -> None:
        received[i] = {name: t.clone() async for name, t in engine.receive_weights()}

    def run(engine: GlooCheckpointEngine, kwargs: dict, role: str, i: int) -> None:
        try:
            engine.init_process_group(**{k: v[i] for k, v in kwargs.items()})
            if role == "send":
                metrics.update(asyncio.run(engine.send_weights(iter(sent.items()))))
            elif role == "walk":
                assert asyncio.run(engine.send_weights(walk(walked))) == {}
            else:
                asyncio.run(receive(engine, i))
            engine.finalize()
        except BaseException as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(actors[0], actor_kwargs, "send", 0)),
        threading.Thread(target=run, args=(actors[1], actor_kwargs, "walk", 1)),
        threading.Thread(target=run, args=(rollouts[0], rollout_kwargs, "receive", 0)),
        threading.Thread(target=run, args=(rollouts[1], rollout_kwargs, "receive", 1)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert walked == list(sent)  # the non-sending actor rank still produced every tensor
    for i in (0, 1):
        assert list(received[i]) == list(sent)
        for name, tensor in sent.items():
            assert received[i][name].dtype == tensor.dtype and received[i][name].shape == tensor.shape
            assert torch.equal(received[i][name], tensor), name
    payload = sum(t.numel() * t.element_size() for t in sent.values())
    # Buckets carry the payload plus at most 15 alignment bytes per tensor.
    assert payload <= metrics["atropos/weight_sync/megabytes"] * 2**20 <= payload + 15 * len(sent)


def test_ranks_refuse_the_wrong_direction() -> None:
    engine = GlooCheckpointEngine(1024)
    engine.init_process_group(rank=-1, world_size=2, root=Root("127.0.0.1", free_port()))
    with pytest.raises(RuntimeError, match="cannot receive"):
        asyncio.run(anext(engine.receive_weights()))
