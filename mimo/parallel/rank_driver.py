"""The rank driver of a tensor-parallel model instance: rank 0 runs the engine, ranks 1..N-1 repeat its forwards.

Rank 0 (the Triton model instance) keeps the scheduler, the KV block manager and sampling exactly as with one
process. A forward pre-hook on its model first broadcasts the step (the token embeddings and the paged-attention
index tensors); every other rank runs the same forward over its own KV cache, so all ranks meet at each all-reduce.
Workers allocate KV pools of rank 0's block counts, so rank 0's block ids are valid on every rank. Embeddings are
replicated, so prompt tables never leave rank 0; only rank 0 computes logits and samples.
"""

from __future__ import annotations

import enum
import multiprocessing
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from mimo.engine.kv_cache import KVCache, LayerKind, kv_layer_specs, layer_kinds
from mimo.engine.paged_attention import PagedAttention, PagedAttentionMetadata, PoolMetadata
from mimo.engine.transfer import to_device
from mimo.loading import load_rank_language_model
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.parallel.deploy import DeployArtifact
from mimo.parallel.distributed import RankContext, init_rank, open_store

_JOIN_TIMEOUT_S = 30  # a worker that got STOP exits at once; one stuck in a collective is terminated


class _Command(enum.IntEnum):
    STOP = 0
    STEP = 1


class StepChannel:
    """Rank 0 -> all ranks: one paged-attention forward (3 broadcasts: sizes, int64 indices, embeddings)."""

    def __init__(self, ctx: RankContext, kinds: list[LayerKind], hidden_size: int, dtype: torch.dtype):
        self.ctx = ctx
        self.kinds = kinds
        self.hidden_size = hidden_size
        self.dtype = dtype

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        return _broadcast(self.ctx, tensor)

    def send_step(self, metadata: PagedAttentionMetadata, input_embeds: torch.Tensor) -> None:
        pools = [metadata.pools[kind] for kind in self.kinds]
        device = input_embeds.device
        sizes = [
            _Command.STEP,
            input_embeds.shape[0],
            len(metadata.query_counts),
            *(p.key_slots.numel() for p in pools),
        ]
        self._broadcast(to_device(sizes, device))
        parts = [metadata.query_positions, to_device(metadata.query_counts, device)]
        for pool in pools:
            parts += [
                pool.slot_mapping,
                pool.key_slots,
                pool.key_positions,
                to_device(pool.key_counts, device),
            ]
        self._broadcast(torch.cat([p.long() for p in parts]))
        self._broadcast(input_embeds.contiguous())

    def send_stop(self) -> None:
        self._broadcast(torch.tensor([_Command.STOP] + [0] * (2 + len(self.kinds)), device=self.ctx.device))

    def receive(self, sliding_window: int | None) -> tuple[PagedAttentionMetadata, torch.Tensor] | None:
        """The next step, or None when rank 0 stops."""
        sizes = self._broadcast(torch.empty(3 + len(self.kinds), dtype=torch.long, device=self.ctx.device)).tolist()
        if sizes[0] == _Command.STOP:
            return None
        num_tokens, num_seqs, key_sizes = sizes[1], sizes[2], sizes[3:]
        total = num_tokens + num_seqs + sum(num_tokens + 2 * k + num_seqs for k in key_sizes)
        flat = self._broadcast(torch.empty(total, dtype=torch.long, device=self.ctx.device))
        part_sizes = [num_tokens, num_seqs] + [n for keys in key_sizes for n in (num_tokens, keys, keys, num_seqs)]
        query_positions, query_counts, *pool_parts = flat.split(part_sizes)
        pools = {}
        for i, kind in enumerate(self.kinds):
            slot_mapping, key_slots, key_positions, key_counts = pool_parts[4 * i : 4 * i + 4]
            pools[kind] = PoolMetadata(slot_mapping, key_slots, key_positions, key_counts.tolist())
        input_embeds = torch.empty(num_tokens, self.hidden_size, dtype=self.dtype, device=self.ctx.device)
        self._broadcast(input_embeds)
        return PagedAttentionMetadata(query_positions, query_counts.tolist(), pools, sliding_window), input_embeds


def rank_devices(instance_device: torch.device, world_size: int, rank_gpus: Sequence[int] = ()) -> list[torch.device]:
    """Devices of ranks 0..N-1 of a model instance: all on the host for a CPU instance; on GPUs, `rank_gpus` (rank r on
    `rank_gpus[r]`), whose first must be the GPU Triton placed the instance (rank 0) on."""
    if instance_device.type != "cuda":
        return [instance_device] * world_size
    if len(rank_gpus) != world_size or rank_gpus[0] != instance_device.index:
        raise ValueError(
            f"a {world_size}-rank model instance on {instance_device} needs {world_size} GPUs for its ranks, the "
            f"first being {instance_device.index}; got {list(rank_gpus)}"
        )
    return [torch.device("cuda", gpu) for gpu in rank_gpus]


class TensorParallelRanks:
    """Rank 0's side of a tensor-parallel model instance: starts ranks 1..N-1 and drives them.

    Usage: `ranks = TensorParallelRanks(deploy, device, dtype, rank_gpus)` (`device`: rank 0's, this process's;
    `rank_gpus`: see `rank_devices`); build the engine on `ranks.model`; `ranks.serve(engine.runner.kv_cache)`;
    `ranks.shutdown()` at the end. A one-rank artifact runs in this process alone.
    """

    def __init__(self, deploy: str | Path, device: torch.device, dtype: torch.dtype, rank_gpus: Sequence[int] = ()):
        artifact = DeployArtifact.open(deploy)
        world_size = artifact.mapping.world_size
        devices = rank_devices(device, world_size, rank_gpus)
        self._store = open_store()  # served by this process for as long as the ranks run
        spawn = multiprocessing.get_context("spawn")
        self._workers = [
            spawn.Process(
                target=_worker_main,
                args=(rank, world_size, self._store.port, devices[rank], str(artifact.path), dtype),
                name=f"mimo-tp-rank{rank}",
                daemon=True,
            )
            for rank in range(1, world_size)
        ]
        self._channel: StepChannel | None = None
        for worker in self._workers:
            worker.start()
        try:
            self.ctx = init_rank(0, world_size, self._store.port, devices[0])
            self.model = load_rank_language_model(artifact, 0, world_size, dtype, devices[0], group=self.ctx.group)
        except BaseException:
            self._terminate_workers()
            raise

    def serve(self, kv_cache: KVCache) -> None:
        """Give the workers `kv_cache`'s geometry and announce every later forward of `self.model` to them."""
        if not self._workers:
            return
        num_blocks = {spec.kind: k.shape[0] for spec, k in zip(kv_cache.specs, kv_cache.k, strict=True)}
        sizes = [kv_cache.block_size, *(num_blocks[kind] for kind in kv_cache.kinds)]
        _broadcast(self.ctx, torch.tensor(sizes, device=self.ctx.device))
        self._channel = StepChannel(self.ctx, kv_cache.kinds, self.model.config.hidden_size, kv_cache.k[0].dtype)
        self.model.register_forward_pre_hook(self._announce)

    def _announce(self, module: MiMoV2ForCausalLM, args: tuple) -> None:
        positions, attn, input_embeds = args
        if not isinstance(attn, PagedAttention):
            raise TypeError(f"a tensor-parallel rank-0 model runs engine steps (PagedAttention), got {type(attn)}")
        self._check_workers()  # a collective would wait for a dead rank until the timeout
        self._channel.send_step(attn.metadata, input_embeds)

    def _check_workers(self) -> None:
        for rank, worker in enumerate(self._workers, start=1):
            if not worker.is_alive():
                raise RuntimeError(f"tensor-parallel rank {rank} exited (code {worker.exitcode})")

    def shutdown(self) -> None:
        """Stop the workers (after the engine's last step) and leave the process group."""
        if not self._workers:
            return
        try:
            self._check_workers()
            if self._channel is not None:
                self._channel.send_stop()
            dist.barrier(group=self.ctx.group)
            dist.destroy_process_group()
        finally:
            self._terminate_workers()

    def _terminate_workers(self) -> None:
        for worker in self._workers:
            worker.join(timeout=_JOIN_TIMEOUT_S)
            if worker.is_alive():
                worker.terminate()
                worker.join()


def _broadcast(ctx: RankContext, tensor: torch.Tensor) -> torch.Tensor:
    dist.broadcast(tensor, src=0, group=ctx.group)
    return tensor


@torch.inference_mode()
def _worker_main(rank: int, world_size: int, port: int, device: torch.device, deploy: str, dtype: torch.dtype) -> None:
    ctx = init_rank(rank, world_size, port, device)
    model = load_rank_language_model(deploy, rank, world_size, dtype, device, group=ctx.group)
    specs = kv_layer_specs(model.config)
    kinds = layer_kinds(specs)
    block_size, *num_blocks = _broadcast(ctx, torch.empty(1 + len(kinds), dtype=torch.long, device=device)).tolist()
    kv_cache = KVCache(specs, dict(zip(kinds, num_blocks, strict=True)), block_size, dtype, device)
    channel = StepChannel(ctx, kinds, model.config.hidden_size, dtype)
    sliding_window = model.config.sliding_attention.sliding_window if LayerKind.SLIDING in kinds else None
    while (step := channel.receive(sliding_window)) is not None:
        metadata, input_embeds = step
        model(metadata.query_positions, PagedAttention(kv_cache, metadata), input_embeds)
    dist.barrier(group=ctx.group)
    dist.destroy_process_group()
