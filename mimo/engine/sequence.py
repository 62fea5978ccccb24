"""Per-request state: tokens, progress, KV block tables, finish state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

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


@dataclass(slots=True)
class DraftState:
    """A speculative sequence's MTP state between steps (ARCHITECTURE.md "Speculative decoding").

    MTP layer k's KV at position i comes from the target's hidden state at i and token i + k + 1.
    """

    mtp_done: list[int]  # per MTP layer k: its KV of positions [0, mtp_done[k]) is from verified tokens
    hidden_start: int = 0  # `hidden` holds the target's pre-norm hidden states of [hidden_start, num_computed)
    hidden: torch.Tensor | None = None  # [num_computed - hidden_start, H]: what the MTP layers still need
    drafts: list[int] = field(default_factory=list)  # proposed tokens after the last one, for the next verify
    draft_probs: torch.Tensor | None = None  # [len(drafts), V] q the drafts were drawn from; None: deterministic

    @classmethod
    def initial(cls, num_mtp_layers: int) -> DraftState:
        return cls([0] * num_mtp_layers)


class Sequence:
    """One request. `token_ids` = prompt + generated; KV exists for the first `num_computed_tokens` of them.

    A step feeds `token_ids[num_computed_tokens : num_computed_tokens + n]`; when that reaches the last token, the
    step samples the next one (a speculative sequence also feeds its drafts and verifies them). Preemption drops the
    KV and resets `num_computed_tokens` to 0 (recompute later).
    """

    def __init__(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                 prompt_table: torch.Tensor | None, generator: torch.Generator | None,
                 num_speculative_tokens: int = 0):
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
        self.num_speculative_tokens = num_speculative_tokens  # MTP drafts per step (0: plain decoding)
        self.draft = DraftState.initial(num_speculative_tokens) if num_speculative_tokens else None

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

    def drop_kv(self) -> None:
        """Forgets every computed token (preemption: the KV is gone, the next admission recomputes)."""
        self.num_computed_tokens = 0
        if self.draft is not None:
            self.draft = DraftState.initial(self.num_speculative_tokens)

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
