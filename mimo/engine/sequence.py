"""Per-request state: tokens, progress, KV block tables, finish state."""

from __future__ import annotations

import enum

import torch

from mimo.engine.kv_cache import LayerKind
from mimo.engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # queued, holds no KV blocks (new or preempted)
    RUNNING = enum.auto()  # holds KV blocks, scheduled every step until it finishes
    FINISHED = enum.auto()


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end_id or a stop token sequence
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # aborted by the caller
    ERROR = "error"  # the step computing it failed


class Sequence:
    """One request. `token_ids` = prompt + generated; KV exists for the first `num_computed_tokens` of them.

    A step feeds `token_ids[num_computed_tokens : num_computed_tokens + n]`; when that reaches the last token, the
    step samples the next one. Preemption drops the KV and resets `num_computed_tokens` to 0 (recompute later).
    """

    def __init__(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                 prompt_table: torch.Tensor | None, generator: torch.Generator | None):
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.sampling = sampling
        self.prompt_table = prompt_table  # [P, H] rows for prompt ids >= vocab_size
        self.generator = generator  # per-request sampling stream when `sampling.seed` is set
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed_tokens = 0
        self.block_tables: dict[LayerKind, list[int]] = {kind: [] for kind in LayerKind}

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def max_num_tokens(self) -> int:
        return self.num_prompt_tokens + self.sampling.max_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def append_token(self, token_id: int) -> list[int]:
        """Appends a sampled token, finishing the sequence on a stop condition.

        Returns the tokens to report: the sampled token, or nothing when it is `end_id` (which is not appended).
        Stop token sequences are reported and kept, as TensorRT-LLM does.
        """
        params = self.sampling
        if token_id == params.end_id:
            self.finish(FinishReason.STOP)
            return []
        self.token_ids.append(token_id)
        num_output = self.num_tokens - self.num_prompt_tokens
        if any(len(stop) <= num_output and tuple(self.token_ids[-len(stop):]) == stop
               for stop in params.stop_token_sequences):
            self.finish(FinishReason.STOP)
        elif num_output >= params.max_tokens:
            self.finish(FinishReason.LENGTH)
        return [token_id]
