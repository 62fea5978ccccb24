"""Which tokens of which sequences run in the next step."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mimo.engine.block_manager import BlockManager
from mimo.engine.sequence import DraftState, FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """The next `num_tokens` uncomputed tokens of `seq` from position `start`: its own tokens, then (a verify)
    its first `num_drafts` draft tokens."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool  # the chunk reaches the sequence's last token, so the step samples (verifies) the next one
    num_drafts: int = 0

    @classmethod
    def next_of(cls, seq: Sequence, num_tokens: int, num_drafts: int = 0) -> ScheduledChunk:
        start = seq.num_computed_tokens
        return cls(seq, start, num_tokens, start + num_tokens - num_drafts == seq.num_tokens, num_drafts)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True, slots=True)
class ChunkResult:
    """What one step gave one chunk."""

    tokens: list[int] = field(default_factory=list)  # sampling chunk: accepted drafts, then the sampled token
    num_accepted: int = 0  # drafts the target accepted (their KV stays; the rest is rolled back)
    draft: DraftState | None = None  # a speculative sequence's MTP state after the step


class Scheduler:
    """Waiting and running queues; every step mixes decodes and prefill chunks under a token and a sequence budget.

    Running sequences go first, in admission order (a decode is one token, or 1 + k with k MTP drafts to verify;
    an unfinished prompt continues with its next chunk); then waiting ones are admitted first-come first-served
    while their whole current length fits in the KV pools. A running sequence that cannot grow preempts the newest
    running one (possibly itself), which returns to the front of the queue and is recomputed from scratch when
    readmitted.

    While sequences run, waiting ones are admitted every `admission_interval` steps (`admitting`): a step with a
    prefill in it cannot replay a decode graph, so admitting the requests of several steps at once leaves the steps
    between them pure decodes. A turn that the token budget cuts short goes on at the next step (else admission
    could not keep up with arrivals); an idle batch admits at once.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_chunk: int,
                 admission_interval: int = 1):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_chunk = max_chunk
        self.admission_interval = admission_interval
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._held_steps = 0  # steps since waiting requests that had room were last admitted

    def admitting(self) -> bool:
        """Whether the next step admits waiting requests (some wait, a slot is free, their turn has come)."""
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return False
        return not self.running or self._held_steps + 1 >= self.admission_interval

    def hold(self) -> None:
        """A step ran without admitting the waiting requests that had room (`admitting()` was false)."""
        if self.waiting and len(self.running) < self.max_num_seqs:
            self._held_steps += 1

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks = []
        admitting = self.admitting()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an earlier sequence in this loop
                continue
            num_drafts = self._num_drafts(seq)
            n = 1 + num_drafts if num_drafts else self._chunk_size(seq, budget)
            if n > budget:  # a verify is never shortened: what a seeded request draws must not depend on the batch
                break
            if self._make_room(seq, seq.num_computed_tokens + n):
                self.block_manager.allocate(seq, seq.num_computed_tokens + n)
                chunks.append(ScheduledChunk.next_of(seq, n, num_drafts))
                budget -= n
        if not admitting:
            self.hold()
            return chunks
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq, seq.num_tokens):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = self._chunk_size(seq, budget)
            chunks.append(ScheduledChunk.next_of(seq, n))
            budget -= n
        # a turn the token budget cut short goes on at the next step: the requests of several steps wait for it
        cut_short = budget == 0 and self.waiting and len(self.running) < self.max_num_seqs
        self._held_steps = self.admission_interval - 1 if cut_short else 0
        return chunks

    def _chunk_size(self, seq: Sequence, budget: int) -> int:
        return min(seq.num_tokens - seq.num_computed_tokens, budget, self.max_chunk)

    @staticmethod
    def _num_drafts(seq: Sequence) -> int:
        """Drafts a decoding sequence verifies next: all it has, but none that could only follow its last token."""
        if seq.draft is None or seq.num_tokens - seq.num_computed_tokens != 1:
            return 0
        return max(0, min(len(seq.draft.drafts), seq.max_num_tokens - seq.num_tokens - 1))

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempts the newest running sequences until `seq` can hold `num_tokens`; False if `seq` was preempted."""
        while not self.block_manager.can_allocate(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.drop_kv()
        self.waiting.appendleft(seq)

    def postprocess(self, chunks: list[ScheduledChunk],
                    results: list[ChunkResult]) -> list[tuple[Sequence, list[int]]]:
        """Advances the scheduled sequences by their step's `results` (one per chunk, in order).

        Tokens of a verify are appended one by one until one finishes the sequence (stop, end_id, max_tokens): the
        rest is dropped. Rejected drafts are rolled back: KV counts only the accepted ones, and the full-attention
        blocks past them go back to the pool. Returns (sequence, new token ids) for every sequence that sampled;
        finished ones have released their KV. Sequences finished while the step ran (aborted) are skipped.
        """
        outputs = []
        for chunk, result in zip(chunks, results, strict=True):
            seq = chunk.seq
            if seq.is_finished:
                continue
            seq.num_computed_tokens = chunk.end - chunk.num_drafts + result.num_accepted
            if result.draft is not None:
                seq.draft = result.draft
            if not chunk.samples:
                continue
            new_token_ids = []
            for token in result.tokens:
                new_token_ids += seq.append_token(token)
                if seq.is_finished:
                    break
            outputs.append((seq, new_token_ids))
            if seq.is_finished:
                self._release(seq)
            elif result.num_accepted < chunk.num_drafts:
                self.block_manager.trim(seq, seq.num_computed_tokens)
        return outputs

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Ends a waiting or running sequence now, releasing its KV."""
        self._release(seq)
        seq.finish(reason)

    def _release(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.block_manager.free(seq)
