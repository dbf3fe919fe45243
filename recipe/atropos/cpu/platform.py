"""A ``cpu`` platform for verl 0.9.1 (selected with ``VERL_PLATFORM=cpu``), registered with verl's PlatformRegistry.

verl asks its platform for the device, the collective backend and memory statistics; on CPU the answers are
"cpu", gloo, and zeros. Ray still needs a GPU resource name for verl's placement groups: the runtime starts Ray
with logical GPUs (``ray_init.num_gpus``) that map to CPU worker processes.

Importing this module (every verl process does, through ``VERL_USE_EXTERNAL_MODULES``) also adjusts two torch calls
that assume an accelerator: ``init_process_group``'s duplicated ``cpu:gloo`` backend string, and FSDP2's pinned CPU
offload, which verl's reference model asks for (:func:`install_unpinned_offload`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

logger = logging.getLogger(__name__)

PLATFORM_NAME = "cpu"


class CPUDeviceModule:
    """What verl calls ``get_torch_device()``: ``torch.cpu`` plus zeros for the CUDA-only memory queries."""

    _ZERO_STATS = ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved")

    def __getattr__(self, name: str) -> Any:
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name in self._ZERO_STATS or name.startswith(("memory_", "max_memory", "reset_")):
            return lambda *args, **kwargs: 0
        if name == "mem_get_info":
            return lambda *args, **kwargs: (0, 0)
        raise AttributeError(f"torch.cpu has no {name!r} and the CPU runtime does not emulate it")

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def current_device(self) -> str:
        return "cpu"

    def set_device(self, device: Any) -> None:
        return None

    def memory_stats(self, *args: Any, **kwargs: Any) -> dict[str, int]:
        return {}

    def get_device_name(self, *args: Any, **kwargs: Any) -> str:
        return "CPU"

    def empty_cache(self) -> None:
        return None

    def synchronize(self, *args: Any, **kwargs: Any) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def get_rng_state(self) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        # verl restores "the device's" RNG from a checkpoint; on CPU that is torch's CPU generator.
        torch.set_rng_state(state)


CPU_DEVICE_MODULE = CPUDeviceModule()


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform answers for a machine without accelerators."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> Any:
        return CPU_DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:  # type: ignore[override]
        # verl does `.to(get_device_id())`: an int would mean accelerator 0 to torch.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str) -> Iterator[None]:
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        # Logical Ray GPUs (ray_init.num_gpus) stand for CPU worker slots so verl's placement logic works unchanged.
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def dedupe_backend(backend: str) -> str:
    """``"cpu:gloo,cpu:gloo"`` → ``"gloo"``: verl joins ``cpu:gloo`` with ``<device>:<backend>``, which torch
    rejects when the device is also cpu."""
    parts = {p.strip() for p in backend.split(",") if p.strip()}
    return "gloo" if parts == {"cpu:gloo"} else backend


def _with_deduped_backend(init: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(init)
    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        if isinstance(kwargs.get("backend"), str):
            kwargs["backend"] = dedupe_backend(kwargs["backend"])
        return init(*args, **kwargs)

    init_process_group.__atropos_cpu_runtime__ = True  # type: ignore[attr-defined]
    return init_process_group


def use_all_cores() -> None:
    """Ray starts workers with OMP_NUM_THREADS=1; on CPU the trainer and the rollout take turns (the endpoint pauses
    generation while the actor trains), so each may use every core. ``ATROPOS_CPU_THREADS`` overrides."""
    threads = int(os.environ.get("ATROPOS_CPU_THREADS", "0")) or os.cpu_count() or 1
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def install_backend_fix() -> None:
    """Wrap torch.distributed.init_process_group once (torch, not verl: verl has no hook for its backend string)."""
    current = torch.distributed.init_process_group
    if not getattr(current, "__atropos_cpu_runtime__", False):
        torch.distributed.init_process_group = _with_deduped_backend(current)


def _unpinned(init: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.pin_memory = False

    __init__.__atropos_cpu_runtime__ = True  # type: ignore[attr-defined]
    return __init__


def install_unpinned_offload() -> None:
    """FSDP2's ``CPUOffloadPolicy`` without pinned memory when no accelerator exists (torch, not verl).

    verl builds every forward-only engine — the reference model — with ``CPUOffloadPolicy(pin_memory=True)``
    (``verl/workers/engine/fsdp/transformer_impl.py``, ``_build_fsdp_module``), and ``Tensor.pin_memory()`` raises
    "Cannot access accelerator device when none is available" on a CPU-only host. Page-locked memory only speeds up
    copies to a device; with none, the parameters already live in ordinary host memory, so unpinned is the same
    policy. With an accelerator nothing changes.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy

    if torch.accelerator.is_available() or getattr(CPUOffloadPolicy.__init__, "__atropos_cpu_runtime__", False):
        return
    CPUOffloadPolicy.__init__ = _unpinned(CPUOffloadPolicy.__init__)  # type: ignore[method-assign]


install_backend_fix()
install_unpinned_offload()
use_all_cores()
