"""The continuous-batching engine: requests in, one `step()` at a time, token deltas out."""

from __future__ import annotations

import logging
import operator
import threading
import time
from dataclasses import dataclass, field, fields

import torch

from mimo.engine.attention_kernel import tile_query_counts
from mimo.engine.block_manager import BlockManager, blocks_per_sequence, sliding_ring_tokens
from mimo.engine.cuda_graphs import graphs_unavailable
from mimo.engine.kv_cache import KVCache, KVLayerSpec, LayerKind, block_bytes, kv_layer_specs, layer_kinds
from mimo.engine.model_runner import LaunchedStep, ModelRunner
from mimo.engine.paged_attention import ATTENTION_KERNELS, use_attention_kernel
from mimo.engine.sampling import InvalidRequestError, Sampler, SamplingParams
from mimo.engine.scheduler import ScheduledChunk, Scheduler
from mimo.engine.sequence import FinishReason, Sequence
from mimo.engine.speculative import DraftOverride, SpeculativeStats
from mimo.models.language_model import MiMoV2ForCausalLM

logger = logging.getLogger(__name__)


def knob(default, help: str):
    """A served config field (EngineConfig's, mimo.serving.encode.EncoderConfig's): a `python -m builders repository`
    flag and a parameter of the model that reads the config, with this one default and help text."""
    return field(default=default, metadata={"help": help})


def knob_help(config_class: type) -> dict[str, str]:
    """The `knob` fields of a config dataclass and their help text, in declaration order."""
    return {f.name: f.metadata["help"] for f in fields(config_class) if "help" in f.metadata}


@dataclass(slots=True)
class EngineConfig:
    """Engine limits and KV sizing. The fields made with `knob` are the served knobs, each with its one default.

    KV pools: give `num_full_blocks`, or `kv_cache_memory_bytes` to split between the pools (the sliding pool first
    gets one ring per sequence slot, the full pool the rest). `num_sliding_blocks` defaults to one ring per slot.
    """

    max_num_seqs: int = knob(32, "sequences in the running batch at most (one sliding KV ring each)")
    max_num_batched_tokens: int = knob(512, "tokens one engine step computes at most (prefill chunks + decodes)")
    max_prefill_chunk: int | None = knob(None, "most tokens one sequence computes per step; sizes the sliding "
                                         "rings (none: max_num_batched_tokens)")
    admission_interval: int = knob(1, "while sequences decode, waiting requests join the batch every this many "
                                   "steps (1: at every step); a step with a prefill runs eagerly, so admitting "
                                   "several steps' arrivals at once lets the steps between replay the decode graphs, "
                                   "at the cost of up to this many steps minus one of time to first token")
    block_size: int = knob(16, "tokens per KV-cache block")
    max_model_len: int = knob(8192, "prompt (media tokens included) + max_tokens of one request at most")
    num_full_blocks: int | None = knob(None, "full-attention KV blocks (instead of kv_cache_memory_bytes)")
    num_sliding_blocks: int | None = knob(None, "sliding-window KV blocks (none: one ring per sequence slot)")
    kv_cache_memory_bytes: int | None = knob(None, "KV-cache budget in bytes, split between the pools "
                                             "(instead of num_full_blocks)")
    seed: int | None = knob(None, "seed of the stream unseeded sampling requests draw from (none: nondeterministic)")
    num_speculative_tokens: int = knob(0, "MTP speculative decoding: tokens the MTP layers draft per sequence and "
                                       "step, verified in one forward (0: off; at most the checkpoint's MTP layers, 3)")
    cuda_graphs: int = knob(1, "decode steps replay CUDA graphs captured at start, one per batch-size bucket up to "
                            "max_num_seqs (1: on, 0: off; used on a single-rank CUDA engine only)")
    overlap_steps: int | None = knob(None, "the host schedules and launches step N+1, fed by step N's tokens on the "
                                     "device, while the device runs step N (1: on, 0: off, none: on a single-rank "
                                     "CUDA engine; never with num_speculative_tokens)")
    warm_up: int | None = knob(None, "at load, a few prompts through prefill, mixed, graph and eager decode steps, "
                               "so the first requests do not pay Triton's kernel compiles (1: on, 0: off, none: on a "
                               "CUDA engine)")
    attention_kernel: str = "auto"  # paged attention: one of mimo.engine.paged_attention.ATTENTION_KERNELS
    device: torch.device | str | None = None  # None = the model's; otherwise must be the model's
    dtype: torch.dtype | None = None  # None = the model's; otherwise must be the model's

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "admission_interval", "block_size", "max_model_len"):
            check_positive_knob(self, name)
        for name in ("max_prefill_chunk", "num_full_blocks", "num_sliding_blocks", "kv_cache_memory_bytes"):
            if getattr(self, name) is not None:
                check_positive_knob(self, name)
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"EngineConfig.attention_kernel={self.attention_kernel!r} is not one of "
                             f"{', '.join(ATTENTION_KERNELS)}")
        if self.cuda_graphs not in (0, 1):  # True / False are 1 / 0
            raise ValueError(f"EngineConfig.cuda_graphs must be 0 or 1, got {self.cuda_graphs!r}")
        for name in ("overlap_steps", "warm_up"):
            if getattr(self, name) not in (None, 0, 1):
                raise ValueError(f"EngineConfig.{name} must be none, 0 or 1, got {getattr(self, name)!r}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"EngineConfig.num_speculative_tokens must be an int >= 0, got {k!r}")
        if (self.num_full_blocks is None) == (self.kv_cache_memory_bytes is None):
            raise ValueError("EngineConfig: give exactly one of num_full_blocks and kv_cache_memory_bytes, got "
                             f"{self.num_full_blocks} and {self.kv_cache_memory_bytes}")
        if self.max_prefill_chunk is None:
            self.max_prefill_chunk = self.max_num_batched_tokens
        if self.max_prefill_chunk > self.max_num_batched_tokens:
            raise ValueError(f"EngineConfig.max_prefill_chunk={self.max_prefill_chunk} exceeds "
                             f"max_num_batched_tokens={self.max_num_batched_tokens}")
        if self.max_prefill_chunk < 1 + k:
            raise ValueError(f"EngineConfig.max_prefill_chunk={self.max_prefill_chunk} is below the 1 + "
                             f"num_speculative_tokens = {1 + k} tokens a verify computes for one sequence")


def engine_knobs() -> dict[str, str]:
    """The served EngineConfig fields and their help text, in declaration order."""
    return knob_help(EngineConfig)


def check_positive_knob(config, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{type(config).__name__}.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one request: new tokens, and the finish reason once it is done."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "cancelled" | "error" when finished
    error: str | None = None  # the failure, when finish_reason is "error"


class LLMEngine:
    """Continuous batching over paged KV: requests join and leave the running batch at every step.

    With `num_speculative_tokens` k > 0 every sequence (unless its request opts out: `SamplingParams.speculative`)
    verifies up to k MTP drafts per step (`mimo.engine.speculative`); `test_draft_override` (tests and benchmarks)
    replaces those drafts.

    Overlapped steps (`EngineConfig.overlap_steps`): `step()` leaves the step it launched running on the device and
    returns what the step before it produced. While the device runs step N, the next `step()` schedules step N+1 as
    the continuation of N's sequences (one token each, fed from N's sampled tokens on the device, never read back
    first), launches it, and only then waits for N's tokens and applies them. A sequence that N finishes (a stop
    token) has computed one token too many in N+1, which is dropped; a step that is not such a continuation (new
    requests to admit, a prefill chunk, KV to make room for) waits for the step ahead first, then is scheduled as
    without overlap. Greedy and seeded tokens are those of the engine without overlap.

    Thread-safety: `add_request`, `abort`, `has_unfinished`, `wait_for_work`, `kv_stats` and `speculative_stats`
    may be called from any thread while one loop thread calls `step()`. The step holds the engine lock only while it
    schedules and while it applies the results, not during the forward: an abort then frees the request's blocks at
    once, and the forwards still in flight write only into blocks that no other sequence can receive before the
    next `schedule()`, whose work the device runs after theirs (one stream).
    """

    def __init__(self, model: MiMoV2ForCausalLM, config: EngineConfig, *,
                 test_draft_override: DraftOverride | None = None):
        self.config = config
        model_config = model.config
        self.vocab_size = model_config.vocab_size
        self.hidden_size = model_config.hidden_size
        self.device, dtype = _model_device_dtype(model, config)
        num_spec = config.num_speculative_tokens
        num_mtp_layers = 0 if model.model.mtp is None else len(model.model.mtp.layers)
        if num_spec > num_mtp_layers:
            raise ValueError(f"EngineConfig.num_speculative_tokens={num_spec} needs {num_spec} MTP layers, the model "
                             f"has {num_mtp_layers} (load it with with_mtp=True)")
        specs = kv_layer_specs(model_config, num_spec)
        kinds = layer_kinds(specs)
        sliding_window = model_config.sliding_attention.sliding_window if LayerKind.SLIDING in kinds else None
        # an MTP layer also recomputes up to k - 1 rows it had drafted from
        rows_per_step = config.max_prefill_chunk + max(0, num_spec - 1)
        ring_tokens = None if sliding_window is None else sliding_ring_tokens(sliding_window, rows_per_step)
        max_blocks_per_seq = {kind: blocks_per_sequence(kind, config.max_model_len, config.max_model_len,
                                                        config.block_size, ring_tokens) for kind in kinds}
        num_blocks = _pool_sizes(config, specs, max_blocks_per_seq, dtype)
        self.block_manager = BlockManager(config.block_size, num_blocks, ring_tokens)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_prefill_chunk, config.admission_interval)
        generator = torch.Generator(device=self.device)
        if config.seed is None:
            generator.seed()
        else:
            generator.manual_seed(config.seed)
        graphs_off = "cuda_graphs=0" if not config.cuda_graphs else graphs_unavailable(
            model, self.device, use_attention_kernel(config.attention_kernel, self.device))
        if config.cuda_graphs and graphs_off and self.device.type == "cuda":
            logger.warning("decode CUDA graphs are off: %s", graphs_off)
        # with graphs, each pool has one block more than the block manager hands out: the padding rows' scratch
        kv_blocks = num_blocks if graphs_off else {kind: n + 1 for kind, n in num_blocks.items()}
        kv_cache = KVCache(specs, kv_blocks, config.block_size, dtype, self.device)
        self.runner = ModelRunner(model, kv_cache, Sampler(generator), sliding_window, config.max_num_seqs,
                                  max_blocks_per_seq, self.device, num_spec, config.attention_kernel,
                                  cuda_graphs=not graphs_off, max_model_len=config.max_model_len)
        overlap = config.overlap_steps
        if overlap is None:
            overlap = self.device.type == "cuda" and model.parallel.mapping.world_size == 1 and not num_spec
        if overlap and num_spec:
            raise ValueError("EngineConfig.overlap_steps=1 cannot run with num_speculative_tokens > 0 (a verify's "
                             "accepted drafts are known only on the host)")
        self.overlap = bool(overlap)
        self._ahead: LaunchedStep | None = None  # the step still running on the device (overlap)
        if test_draft_override is not None:
            if self.runner.drafter is None:
                raise ValueError("test_draft_override needs EngineConfig.num_speculative_tokens > 0")
            self.runner.drafter.test_draft_override = test_draft_override
        self._speculative_stats = SpeculativeStats()
        self._sequences: dict[str, Sequence] = {}  # unfinished requests by id
        self._pending_outputs: list[RequestOutput] = []  # aborts, reported by the next step
        self._lock = threading.Lock()
        self._work_added = threading.Condition(self._lock)

    def add_request(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                    prompt_table: torch.Tensor | None = None) -> None:
        """Queues a request; raises `InvalidRequestError` (a ValueError) naming the problem, allocating nothing.

        Args:
            prompt_ids: token ids; ids >= vocab_size select row `id - vocab_size` of `prompt_table`.
            prompt_table: `[P, hidden_size]` multimodal embeddings of this request (TensorRT-LLM prompt table).
        """
        prompt_ids = self._validate(request_id, prompt_ids, sampling, prompt_table)
        if prompt_table is not None:
            prompt_table = prompt_table.to(self.device)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        num_spec = self.config.num_speculative_tokens if sampling.speculative else 0
        seq = Sequence(request_id, prompt_ids, sampling, prompt_table, generator, num_spec)
        with self._lock:
            if request_id in self._sequences:
                raise InvalidRequestError(f"request_id {request_id!r} is already in use by an unfinished request")
            self._sequences[request_id] = seq
            self.scheduler.add(seq)
            self._work_added.notify_all()

    def abort(self, request_id: str) -> bool:
        """Ends a request and frees its KV now; the next `step()` reports it as "cancelled". False if unknown."""
        with self._lock:
            seq = self._sequences.pop(request_id, None)
            if seq is None:
                return False
            self.scheduler.finish(seq, FinishReason.CANCELLED)
            self._pending_outputs.append(RequestOutput(request_id, [], True, FinishReason.CANCELLED.value))
            self._work_added.notify_all()
            return True

    def step(self) -> list[RequestOutput]:
        """Runs one batch (decodes and prefill chunks) and returns what each request got from it (with overlap: from
        the step before it, while it runs on)."""
        with self._lock:
            outputs, self._pending_outputs = self._pending_outputs, []
            ahead, self._ahead = self._ahead, None
            chunks = None if ahead is None else self._continuations(ahead)
            if chunks:
                inputs = self.runner.prepare(chunks, fed=ahead.fed_tokens([chunk.seq for chunk in chunks]))
        if chunks:
            launched = self._launch(inputs, outputs)
            if self._complete(ahead, outputs):
                self._ahead = launched
            return outputs
        if ahead is not None:
            self._complete(ahead, outputs)
        with self._lock:
            chunks = self.scheduler.schedule()
            if not chunks:
                return outputs
            inputs = self.runner.prepare(chunks)
        launched = self._launch(inputs, outputs)
        if launched is not None and self.overlap:
            self._ahead = launched
        elif launched is not None:
            self._complete(launched, outputs)
        return outputs

    @property
    def warms_up_at_load(self) -> bool:
        """Whether a server runs `warm_up()` before it takes requests (`EngineConfig.warm_up`)."""
        return self.device.type == "cuda" if self.config.warm_up is None else bool(self.config.warm_up)

    def warm_up(self) -> float:
        """Launches serving's kernels once before the first request: a long prompt alone (its prefill chunks, a
        token count divisible by 16 where it can be), then a short one that joins while it decodes (a mixed step),
        decode steps of both through the graphs, then eager decode steps (what the graphs do not cover: mixed
        steps, more sequences than the largest bucket) of both, beside one prompt per attention tile shape, and of
        the long one alone. Triton compiles a kernel
        variant (its constexprs, and whether integer arguments are 1 or divisible by 16) at its first launch,
        seconds in all in a process whose cache directory is new (a fresh container); without this the first
        requests pay them (BENCHMARKS.md, the first requests). Greedy, so no random stream is drawn from; the
        engine is idle, every KV block free and the MTP counters at zero afterwards. Returns its seconds."""
        if self.has_unfinished():
            raise RuntimeError("warm_up() needs an idle engine")
        start = time.perf_counter()
        config, decode_steps = self.config, 4
        # more rows than the fused MoE kernel's small-batch tiles take, fewer than the grouped GEMM's
        short = min(100, config.max_prefill_chunk, config.max_num_batched_tokens - 1)
        # then, one per eager step, a prompt of each length below `short` that selects another attention tile
        model_config = self.runner.model.config
        middle = sorted({count for layer_type in set(model_config.layer_types)
                         for spec in [model_config.attention_spec(layer_type)]
                         for count in tile_query_counts(spec.num_heads, spec.num_kv_heads, short - 1) if count > 1})
        short = min(short, config.max_model_len - 2 * decode_steps - len(middle))
        long = min(config.max_prefill_chunk, config.max_num_batched_tokens,
                   config.max_model_len - 4 * decode_steps - len(middle))
        long -= long % 16 if long >= 16 else 0

        def add(request_id: str, prompt_len: int, max_tokens: int) -> None:  # within max_model_len however short
            prompt_len = max(1, min(prompt_len, config.max_model_len - 1))
            max_tokens = max(1, min(max_tokens, config.max_model_len - prompt_len))
            self.add_request(request_id, [i % self.vocab_size for i in range(prompt_len)],
                             SamplingParams(max_tokens=max_tokens, temperature=0.0))

        graphs, joined, steps_after = self.runner.graphs, short < 1, 0
        interval, self.scheduler.admission_interval = self.scheduler.admission_interval, 1  # joins when added
        add("warm-up-long", long, 4 * decode_steps + len(middle))
        try:
            while self.has_unfinished():
                outputs = self.step()
                if not joined and any(output.new_token_ids for output in outputs):
                    add("warm-up-short", short, 2 * decode_steps + len(middle))
                    joined = True
                elif joined:
                    steps_after += 1
                    if steps_after == 1 + decode_steps:  # the mixed step, graph steps: eager from here on
                        self.runner.graphs = None
                    if 0 < steps_after - decode_steps <= len(middle):
                        count = middle[steps_after - decode_steps - 1]
                        add(f"warm-up-{count}", count, 2)
        finally:
            self.runner.graphs = graphs
            self.scheduler.admission_interval = interval
        self._speculative_stats = SpeculativeStats()
        return time.perf_counter() - start

    def _continuations(self, ahead: LaunchedStep) -> list[ScheduledChunk] | None:
        """Under the lock: the next step as one more token of every sequence of `ahead` that goes on after it
        (with the KV blocks it needs), or None when the next step is anything else."""
        scheduler = self.scheduler
        if scheduler.admitting():
            return None  # requests to admit
        chunks = []
        for chunk in ahead.chunks:
            seq = chunk.seq
            if not chunk.samples or chunk.num_drafts:
                return None  # a prefill chunk that goes on, or a verify
            if seq.is_finished:  # aborted meanwhile
                continue
            if seq.num_tokens + 2 <= seq.max_num_tokens:  # else ahead's token is its last
                chunks.append(ScheduledChunk(seq, chunk.end, 1, samples=True))
        live = sum(not chunk.seq.is_finished for chunk in ahead.chunks)
        if not chunks or live != len(scheduler.running) or len(chunks) > self.config.max_num_batched_tokens:
            return None  # a running sequence outside ahead (budget, preemption) is scheduled as usual
        manager = self.block_manager
        for chunk in chunks:
            if not manager.can_allocate(chunk.seq, chunk.end):
                return None  # room is made by preemption, which schedule() decides
            manager.allocate(chunk.seq, chunk.end)
        scheduler.hold()  # a step without the waiting requests, as schedule() counts its own
        return chunks

    def _launch(self, inputs, outputs: list[RequestOutput]) -> LaunchedStep | None:
        """Queues the step on the device; None when that failed (its requests finished with the error)."""
        try:
            return self.runner.launch(inputs)
        except Exception as exc:  # noqa: BLE001 - the batch's requests fail, the engine and later requests go on
            self._fail(inputs.chunks, exc, outputs)
            return None

    def _complete(self, launched: LaunchedStep, outputs: list[RequestOutput]) -> bool:
        """Waits for a launched step's tokens and applies them; False when the step failed (its requests finished
        with the error)."""
        try:
            results = self.runner.complete(launched)
        except Exception as exc:  # noqa: BLE001
            self._fail(launched.chunks, exc, outputs)
            return False
        with self._lock:
            for chunk, result in zip(launched.chunks, results):
                self._speculative_stats.count(chunk.num_drafts, result.num_accepted)
            for seq, new_token_ids in self.scheduler.postprocess(launched.chunks, results):
                reason = seq.finish_reason.value if seq.is_finished else None
                outputs.append(RequestOutput(seq.request_id, new_token_ids, seq.is_finished, reason))
                if seq.is_finished:
                    del self._sequences[seq.request_id]
        return True

    def _fail(self, chunks: list[ScheduledChunk], exc: Exception, outputs: list[RequestOutput]) -> None:
        logger.error("engine step failed; finishing its %d requests with an error", len(chunks), exc_info=exc)
        with self._lock:
            for seq in (chunk.seq for chunk in chunks if not chunk.seq.is_finished):
                self.scheduler.finish(seq, FinishReason.ERROR)
                del self._sequences[seq.request_id]
                outputs.append(RequestOutput(seq.request_id, [], True, FinishReason.ERROR.value,
                                             f"{type(exc).__name__}: {exc}"))

    def has_unfinished(self) -> bool:
        with self._lock:
            return self._has_work()

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Blocks until there is something for `step()` to do or `timeout` seconds pass; True if there is."""
        with self._work_added:
            return self._work_added.wait_for(self._has_work, timeout)

    def kv_stats(self) -> dict[str, dict[str, int]]:
        """`{"full" | "sliding": {"free_blocks": n, "total_blocks": n}}` for the pools this model has."""
        with self._lock:
            return self.block_manager.stats()

    def speculative_stats(self) -> dict[str, int]:
        """MTP counters since start: `verifications`, `draft_tokens`, `accepted_tokens` (`SpeculativeStats`)."""
        with self._lock:
            stats = self._speculative_stats
            return {"verifications": stats.verifications, "draft_tokens": stats.draft_tokens,
                    "accepted_tokens": stats.accepted_tokens}

    def _has_work(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending_outputs)

    def _validate(self, request_id: str, prompt_ids, sampling: SamplingParams,
                  prompt_table: torch.Tensor | None) -> list[int]:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request_id must be a non-empty str, got {request_id!r}")
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        try:
            ids = [operator.index(t) for t in prompt_ids]
        except TypeError:
            raise InvalidRequestError("prompt_ids must be a sequence of ints") from None
        if not ids:
            raise InvalidRequestError(f"request {request_id!r}: prompt_ids is empty")
        too_long = context_overflow(len(ids), sampling.max_tokens, self.config.max_model_len)
        if too_long:
            raise InvalidRequestError(f"request {request_id!r}: {too_long}")
        lowest, highest = min(ids), max(ids)
        if lowest < 0:
            raise InvalidRequestError(f"request {request_id!r}: prompt id {lowest} is negative")
        if prompt_table is not None:
            if prompt_table.dim() != 2 or prompt_table.shape[1] != self.hidden_size:
                raise InvalidRequestError(f"request {request_id!r}: prompt_table must be [P, {self.hidden_size}] "
                                          f"(hidden_size), got {tuple(prompt_table.shape)}")
        num_rows = 0 if prompt_table is None else prompt_table.shape[0]
        if highest >= self.vocab_size + num_rows:
            raise InvalidRequestError(
                f"request {request_id!r}: prompt id {highest} >= vocab_size {self.vocab_size} needs prompt_table row "
                f"{highest - self.vocab_size}, but the request has " +
                ("no prompt_table" if prompt_table is None else f"a prompt_table of {num_rows} rows"))
        if sampling.end_id is not None and sampling.end_id >= self.vocab_size:
            raise InvalidRequestError(f"request {request_id!r}: end_id {sampling.end_id} >= vocab_size "
                                      f"{self.vocab_size}")
        if any(max(stop) >= self.vocab_size for stop in sampling.stop_token_sequences):
            raise InvalidRequestError(f"request {request_id!r}: stop_token_sequences hold ids >= vocab_size "
                                      f"{self.vocab_size}")
        return ids


def context_overflow(prompt_len: int, max_tokens: int, max_model_len: int) -> str | None:
    """Why a prompt of `prompt_len` tokens cannot generate `max_tokens` within `max_model_len`; None if it fits."""
    total = prompt_len + max_tokens
    if total <= max_model_len:
        return None
    return f"prompt length {prompt_len} + max_tokens {max_tokens} = {total} exceeds max_model_len {max_model_len}"


def _model_device_dtype(model: MiMoV2ForCausalLM, config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    weight = model.model.embed_tokens.weight
    # an empty tensor resolves an index-less "cuda" to the current device, as the model's placement did
    if config.device is not None and torch.empty(0, device=config.device).device != weight.device:
        raise ValueError(f"EngineConfig.device={config.device} but the model is on {weight.device}")
    if config.dtype is not None and config.dtype != weight.dtype:
        raise ValueError(f"EngineConfig.dtype={config.dtype} but the model is {weight.dtype}")
    return weight.device, weight.dtype


def _pool_sizes(config: EngineConfig, specs: list[KVLayerSpec], max_blocks_per_seq: dict[LayerKind, int],
                dtype: torch.dtype) -> dict[LayerKind, int]:
    """Blocks per pool; each pool must hold at least one sequence of `max_model_len` tokens."""
    num_blocks = {}
    if LayerKind.SLIDING in max_blocks_per_seq:
        ring_blocks = max_blocks_per_seq[LayerKind.SLIDING]
        num_blocks[LayerKind.SLIDING] = config.num_sliding_blocks or config.max_num_seqs * ring_blocks
        if num_blocks[LayerKind.SLIDING] < ring_blocks:
            raise ValueError(f"EngineConfig.num_sliding_blocks={num_blocks[LayerKind.SLIDING]} is below one "
                             f"sequence's ring of {ring_blocks} blocks")
    if LayerKind.FULL in max_blocks_per_seq:
        if config.num_full_blocks is not None:
            num_blocks[LayerKind.FULL] = config.num_full_blocks
        else:
            sliding_bytes = num_blocks.get(LayerKind.SLIDING, 0) * block_bytes(
                specs, LayerKind.SLIDING, config.block_size, dtype)
            num_blocks[LayerKind.FULL] = max(0, config.kv_cache_memory_bytes - sliding_bytes) // block_bytes(
                specs, LayerKind.FULL, config.block_size, dtype)
        if num_blocks[LayerKind.FULL] < max_blocks_per_seq[LayerKind.FULL]:
            raise ValueError(f"KV budget gives {num_blocks[LayerKind.FULL]} full-attention blocks, below the "
                             f"{max_blocks_per_seq[LayerKind.FULL]} one max_model_len={config.max_model_len} "
                             "sequence needs")
    return num_blocks


def generate(engine: LLMEngine, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams],
             prompt_tables: list[torch.Tensor | None] | None = None) -> list[list[int]]:
    """Runs `prompts` to completion on an otherwise idle engine; returns each one's generated ids (offline use)."""
    if engine.has_unfinished():
        raise RuntimeError("generate() needs an idle engine")
    params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    tables = prompt_tables or [None] * len(prompts)
    if not len(params) == len(tables) == len(prompts):
        raise ValueError(f"{len(prompts)} prompts, {len(params)} sampling params, {len(tables)} prompt tables")
    request_ids = [f"generate-{i}" for i in range(len(prompts))]
    try:
        for request_id, prompt, p, table in zip(request_ids, prompts, params, tables):
            engine.add_request(request_id, prompt, p, table)
    except InvalidRequestError:
        for request_id in request_ids:
            engine.abort(request_id)
        engine.step()  # reports the aborts, leaving the engine idle
        raise
    generated: dict[str, list[int]] = {request_id: [] for request_id in request_ids}
    while engine.has_unfinished():
        for output in engine.step():
            generated[output.request_id] += output.new_token_ids
    return [generated[request_id] for request_id in request_ids]
