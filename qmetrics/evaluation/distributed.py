"""One evaluation over several processes (``torchrun``): which rank this is, its device, the
process group, and gathering small Python objects.

``torchrun --nproc_per_node N -m qmetrics ...`` starts N processes with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set (multi-node: the same
variables, set by torchrun on every node). :func:`init_from_env` joins them into the default
process group (NCCL when this rank runs on CUDA, gloo otherwise) only when ``WORLD_SIZE > 1``;
a plain ``qmetrics`` run never touches ``torch.distributed``. Each rank runs its own models on
:func:`rank_device` (``cuda:LOCAL_RANK`` on a CUDA machine, else the CPU).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def launched_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 outside torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"WORLD_SIZE must be an integer, got {value!r}") from exc


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(requested: str) -> str:
    """The device this rank loads its models on: under torchrun (``WORLD_SIZE > 1``)
    ``"auto"`` and ``"cuda"`` become ``cuda:LOCAL_RANK`` when CUDA is available (``"auto"``
    becomes ``"cpu"`` otherwise); anything else, and every single-process run, keeps
    ``requested``."""
    if launched_world_size() <= 1 or requested not in ("auto", "cuda"):
        return requested
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu" if requested == "auto" else requested


def init_from_env(device: str) -> bool:
    """Join torchrun's processes in the default process group when ``WORLD_SIZE > 1`` and no
    group exists yet: backend NCCL when ``device`` is a CUDA device (made the current one),
    gloo otherwise; rendezvous from the environment (``env://``). Returns whether this call
    created the group (the caller then ends it with :func:`shutdown`)."""
    if launched_world_size() <= 1:
        return False
    dist = torch.distributed
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dist.is_initialized():
        return False
    cuda = torch.device(device).type == "cuda" if device != "auto" else False
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def shutdown() -> None:
    """End the default process group (a no-op without one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group.
    Collective: every rank must call it."""
    _, world = rank_and_world()
    if world <= 1:
        return [obj]
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, obj)
    return parts


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank (``value`` itself without a process group).
    Collective: every rank must call it."""
    return int(all_gather_objects(int(value))[src])
