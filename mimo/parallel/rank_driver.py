"""The rank driver of a tensor-parallel model instance: rank 0 runs the engine, ranks 1..N-1 repeat its forwards.

Rank 0 (the Triton model instance) keeps the scheduler, the KV block manager and sampling exactly as with one
process. Forward pre-hooks on its decoder stack (`model.model`) and its MTP layers first broadcast the forward
(the token embeddings, for an MTP layer also the target hidden states it reads, and the paged-attention index
tensors); every other rank runs the same forward over its own KV cache, so all ranks meet at each all-reduce.
Workers allocate KV pools of rank 0's block counts (and its MTP layers), so rank 0's block ids are valid on every
rank. Embeddings are replicated, so prompt tables never leave rank 0; only rank 0 computes logits and samples.
"""

from __future__ import annotations

import enum
import multiprocessing
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from mimo.engine.kv_cache import KVCache, LayerKind, kv_layer_specs
from mimo.engine.paged_attention import PagedAttention, PagedAttentionMetadata, PoolMetadata
from mimo.engine.transfer import to_device
from mimo.loading import load_rank_language_model
from mimo.models.language_model import MiMoV2Model
from mimo.models.mtp import MiMoV2MTP
from mimo.parallel.deploy import DeployArtifact
from mimo.parallel.distributed import RankContext, init_rank, open_store

_JOIN_TIMEOUT_S = 30  # a worker that got STOP exits at once; one stuck in a collective is terminated
_GEOMETRY_SIZE = 2 + len(LayerKind)  # serve's header: block size, MTP layers, blocks per pool kind


class _Command(enum.IntEnum):
    STOP = 0
    STEP = 1  # the decoder layers: `model.model(positions, attn, input_embeds)`
    MTP = 2  # one MTP layer: `model.model.mtp(mtp_idx, positions, attn, token_embeds, target_hidden)`


class StepChannel:
    """Rank 0 -> all ranks: one paged-attention forward (3 broadcasts: sizes, int64 indices, the [T, H] inputs)."""

    def __init__(self, ctx: RankContext, kinds: list[LayerKind], hidden_size: int, dtype: torch.dtype):
        self.ctx = ctx
        self.kinds = kinds
        self.hidden_size = hidden_size
        self.dtype = dtype

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        return _broadcast(self.ctx, tensor)

    def send(self, command: _Command, metadata: PagedAttentionMetadata, inputs: list[torch.Tensor],
             mtp_idx: int = 0) -> None:
        """`inputs`: `[T, H]` each, the embeddings (STEP) or the token embeddings and target hidden states (MTP)."""
        pools = [metadata.pools.get(kind) for kind in self.kinds]  # an MTP layer's step has the sliding pool only
        device = inputs[0].device
        # per pool: -1 when absent, else the width of its block tables and (reference path) its attended keys
        sizes = [command, mtp_idx, inputs[0].shape[0], len(metadata.query_counts), int(metadata.use_kernel),
                 *(-1 if p is None else p.block_table.shape[1] for p in pools),
                 *(-1 if p is None or p.key_slots is None else p.key_slots.numel() for p in pools)]
        self._broadcast(to_device(sizes, device))
        parts = [metadata.query_positions, to_device(metadata.query_counts, device), metadata.cu_query,
                 metadata.seq_ends]
        for pool in (p for p in pools if p is not None):
            parts += [pool.slot_mapping, pool.block_table.flatten(), pool.table_lens, to_device(pool.key_counts, device)]
            if not metadata.use_kernel:
                parts += [pool.key_slots, pool.key_positions]
        self._broadcast(torch.cat([p.long() for p in parts]))
        self._broadcast(torch.cat(inputs, dim=1).contiguous())

    def send_stop(self) -> None:
        self._broadcast(torch.tensor([_Command.STOP] + [0] * (4 + 2 * len(self.kinds)), device=self.ctx.device))

    def receive(self, sliding_window: int | None) -> tuple[_Command, int, PagedAttentionMetadata,
                                                           list[torch.Tensor]] | None:
        """The next forward (command, MTP layer, metadata, inputs), or None when rank 0 stops."""
        header = torch.empty(5 + 2 * len(self.kinds), dtype=torch.long, device=self.ctx.device)
        command, mtp_idx, num_tokens, num_seqs, use_kernel, *pool_sizes = self._broadcast(header).tolist()
        if command == _Command.STOP:
            return None
        widths, key_sizes = pool_sizes[:len(self.kinds)], pool_sizes[len(self.kinds):]
        present = [(kind, width, keys) for kind, width, keys in zip(self.kinds, widths, key_sizes, strict=True)
                   if width >= 0]
        part_sizes = [num_tokens, num_seqs, num_seqs + 1, num_seqs]
        for _, width, keys in present:
            part_sizes += [num_tokens, num_seqs * width, num_seqs, num_seqs] + ([] if use_kernel else [keys, keys])
        flat = self._broadcast(torch.empty(sum(part_sizes), dtype=torch.long, device=self.ctx.device))
        query_positions, query_counts, cu_query, seq_ends, *pool_parts = flat.split(part_sizes)
        pools = {}
        for kind, width, _ in present:
            slot_mapping, table, table_lens, key_counts, *keys = pool_parts[:6 - 2 * use_kernel]
            pool_parts = pool_parts[6 - 2 * use_kernel:]
            key_slots, key_positions = keys or (None, None)
            pools[kind] = PoolMetadata(slot_mapping, table.view(num_seqs, width), table_lens, key_counts.tolist(),
                                       key_slots, key_positions)
        num_inputs = 1 if command == _Command.STEP else 2
        inputs = torch.empty(num_tokens, num_inputs * self.hidden_size, dtype=self.dtype, device=self.ctx.device)
        self._broadcast(inputs)
        metadata = PagedAttentionMetadata(query_positions, query_counts.tolist(), pools, sliding_window,
                                          cu_query.int(), seq_ends.int(), bool(use_kernel))
        return _Command(command), mtp_idx, metadata, list(inputs.split(self.hidden_size, dim=1))


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
    `rank_gpus`: see `rank_devices`; `with_mtp`: load the MTP layers, for speculative decoding); build the engine
    on `ranks.model`; `ranks.serve(engine.runner.kv_cache)`; `ranks.shutdown()` at the end. A one-rank artifact
    runs in this process alone.
    """

    def __init__(self, deploy: str | Path, device: torch.device, dtype: torch.dtype, rank_gpus: Sequence[int] = (),
                 *, with_mtp: bool = False):
        artifact = DeployArtifact.open(deploy)
        world_size = artifact.mapping.world_size
        devices = rank_devices(device, world_size, rank_gpus)
        self._store = open_store()  # served by this process for as long as the ranks run
        spawn = multiprocessing.get_context("spawn")
        self._workers = [
            spawn.Process(
                target=_worker_process,
                args=(rank, world_size, self._store.port, devices[rank], str(artifact.path), dtype, with_mtp),
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
            self.model = load_rank_language_model(artifact, 0, world_size, dtype, devices[0], group=self.ctx.group,
                                                  with_mtp=with_mtp)
        except BaseException:
            self._terminate_workers()
            raise

    def serve(self, kv_cache: KVCache) -> None:
        """Give the workers `kv_cache`'s geometry and announce every later forward of `self.model` to them."""
        if not self._workers:
            return
        num_blocks = {spec.kind: k.shape[0] for spec, k in zip(kv_cache.specs, kv_cache.k, strict=True)}
        num_mtp_layers = len(kv_cache.specs) - self.model.config.num_hidden_layers
        sizes = [kv_cache.block_size, num_mtp_layers, *(num_blocks.get(kind, -1) for kind in LayerKind)]
        assert len(sizes) == _GEOMETRY_SIZE and kv_cache.block_size > 0
        _broadcast(self.ctx, torch.tensor(sizes, device=self.ctx.device))
        self._channel = StepChannel(self.ctx, kv_cache.kinds, self.model.config.hidden_size, kv_cache.k[0].dtype)
        self.model.model.register_forward_pre_hook(self._announce_step)
        if num_mtp_layers:
            self.model.model.mtp.register_forward_pre_hook(self._announce_mtp)

    def _announce_step(self, module: MiMoV2Model, args: tuple) -> None:
        positions, attn, input_embeds = args
        self._channel.send(_Command.STEP, self._metadata(attn), [input_embeds])

    def _announce_mtp(self, module: MiMoV2MTP, args: tuple) -> None:
        mtp_idx, positions, attn, token_embeds, target_hidden = args
        self._channel.send(_Command.MTP, self._metadata(attn), [token_embeds, target_hidden], mtp_idx)

    def _metadata(self, attn) -> PagedAttentionMetadata:
        if not isinstance(attn, PagedAttention):
            raise TypeError(f"a tensor-parallel rank-0 model runs engine steps (PagedAttention), got {type(attn)}")
        self._check_workers()  # a collective would wait for a dead rank until the timeout
        return attn.metadata

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
            else:  # never served: the workers wait for the KV geometry; a block size of 0 tells them to stop
                _broadcast(self.ctx, torch.zeros(_GEOMETRY_SIZE, dtype=torch.long, device=self.ctx.device))
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


def _worker_process(*args) -> None:
    """A worker rank's process: `_worker_main`, then an exit without the interpreter's finalisation. The process
    group is gone by then; what finalisation would still destroy is c10d's threads, which once aborted a worker
    that had left cleanly ("terminate called without an active exception", exit -6). An error still exits 1."""
    _worker_main(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@torch.inference_mode()
def _worker_main(rank: int, world_size: int, port: int, device: torch.device, deploy: str, dtype: torch.dtype,
                 with_mtp: bool) -> None:
    ctx = init_rank(rank, world_size, port, device)
    model = load_rank_language_model(deploy, rank, world_size, dtype, device, group=ctx.group, with_mtp=with_mtp)
    header = torch.empty(_GEOMETRY_SIZE, dtype=torch.long, device=device)
    block_size, num_mtp_layers, *num_blocks = _broadcast(ctx, header).tolist()
    if block_size == 0:  # rank 0 shut down before serving (its engine did not build)
        dist.barrier(group=ctx.group)
        dist.destroy_process_group()
        return
    pools = {kind: n for kind, n in zip(LayerKind, num_blocks, strict=True) if n >= 0}
    kv_cache = KVCache(kv_layer_specs(model.config, num_mtp_layers), pools, block_size, dtype, device)
    channel = StepChannel(ctx, kv_cache.kinds, model.config.hidden_size, dtype)
    sliding_window = model.config.sliding_attention.sliding_window if LayerKind.SLIDING in kv_cache.kinds else None
    while (forward := channel.receive(sliding_window)) is not None:
        command, mtp_idx, metadata, inputs = forward
        attn = PagedAttention(kv_cache, metadata)
        if command == _Command.STEP:
            model.model(metadata.query_positions, attn, *inputs)
        else:
            model.model.mtp(mtp_idx, metadata.query_positions, attn, *inputs)
    dist.barrier(group=ctx.group)
    dist.destroy_process_group()
