"""One process per rank: process-group setup (gloo on CPU, NCCL on CUDA) and spawning ranks on one host.

The rendezvous is a TCPStore the launching process opens on port 0 (the OS picks a free port), so no address
or port is fixed and concurrent launches cannot collide.
"""

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STORE_HOST = "127.0.0.1"  # ranks of one model instance share a host
_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class RankContext:
    rank: int
    world_size: int
    device: torch.device  # cuda:rank under NCCL, cpu under gloo
    group: dist.ProcessGroup | None  # None when world_size == 1 (no process group)


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def open_store() -> dist.TCPStore:
    """The rendezvous store of a launch, served by the calling process on a free port (`store.port`)."""
    return dist.TCPStore(STORE_HOST, 0, is_master=True, wait_for_workers=False, timeout=_TIMEOUT)


def rank_device(rank: int, device_type: str) -> torch.device:
    """cuda:rank for CUDA ranks; the host for CPU ranks."""
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device(device_type)


def init_rank(rank: int, world_size: int, store_port: int, device: torch.device) -> RankContext:
    """Join the process group of the launch whose store listens on `store_port`, computing on `device`."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return RankContext(0, 1, device, None)
    if device.type == "cpu":  # ranks share the host's cores; oversubscribed threads stall every collective
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    store = dist.TCPStore(STORE_HOST, store_port, is_master=False, timeout=_TIMEOUT)
    dist.init_process_group(
        backend_for(device.type),
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    return RankContext(rank, world_size, device, dist.group.WORLD)


def spawn_ranks(worker: Callable[..., None], world_size: int, device_type: str, *args) -> None:
    """Run `worker(ctx: RankContext, *args)` in `world_size` fresh processes and wait for all of them.

    `worker` must be a module-level function (spawned processes import it). A failing rank's exception is
    re-raised here with its traceback. A world of one runs in the calling process, without a process group.
    """
    if world_size == 1:
        worker(init_rank(0, 1, 0, rank_device(0, device_type)), *args)
        return
    if device_type == "cuda" and torch.cuda.device_count() < world_size:
        raise RuntimeError(f"{world_size} ranks need {world_size} CUDA devices, found {torch.cuda.device_count()}")
    store = open_store()
    mp.start_processes(
        _run_rank, args=(worker, world_size, store.port, device_type, args), nprocs=world_size, start_method="spawn"
    )


def _run_rank(rank: int, worker: Callable[..., None], world_size: int, port: int, device_type: str, args) -> None:
    ctx = init_rank(rank, world_size, port, rank_device(rank, device_type))
    worker(ctx, *args)
    # No rank tears down its connections while a peer may still use them (gloo aborts on a closed peer).
    dist.barrier()
    dist.destroy_process_group()
    # Then leave without interpreter finalization: a gloo thread still joinable when it runs aborts the process
    # ("terminate called without an active exception", seen once in CI after a rank had finished its work).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
