"""Which tokens of which sequences run in the next step."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from mimo.engine.block_manager import BlockManager
from mimo.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """The next `num_tokens` uncomputed tokens of `seq`, from position `start`."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool  # the chunk reaches the sequence's last token, so the step samples the next one

    @classmethod
    def next_of(cls, seq: Sequence, num_tokens: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        return cls(seq, start, num_tokens, start + num_tokens == seq.num_tokens)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


class Scheduler:
    """Waiting and running queues; every step mixes decodes and prefill chunks under a token and a sequence budget.

    Running sequences go first, in admission order (a decode is one token, an unfinished prompt continues with its
    next chunk); then waiting ones are admitted first-come first-served while their whole current length fits in
    the KV pools. A running sequence that cannot grow preempts the newest running one (possibly itself), which
    returns to the front of the queue and is recomputed from scratch when readmitted.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_chunk: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_chunk = max_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an earlier sequence in this loop
                continue
            n = self._chunk_size(seq, budget)
            if self._make_room(seq, seq.num_computed_tokens + n):
                self.block_manager.allocate(seq, seq.num_computed_tokens + n)
                chunks.append(ScheduledChunk.next_of(seq, n))
                budget -= n
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
        return chunks

    def _chunk_size(self, seq: Sequence, budget: int) -> int:
        return min(seq.num_tokens - seq.num_computed_tokens, budget, self.max_chunk)

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
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)

    def postprocess(self, chunks: list[ScheduledChunk], sampled: list[int]) -> list[tuple[Sequence, list[int]]]:
        """Advances the scheduled sequences; `sampled` has one token per sampling chunk, in order.

        Returns (sequence, new token ids) for every sequence that sampled; finished ones have released their KV.
        Sequences finished while the step ran (aborted) are skipped.
        """
        results = []
        tokens = iter(sampled)
        for chunk in chunks:
            seq = chunk.seq
            token = next(tokens) if chunk.samples else None
            if seq.is_finished:
                continue
            seq.num_computed_tokens = chunk.end
            if token is not None:
                results.append((seq, seq.append_token(token)))
                if seq.is_finished:
                    self._release(seq)
        return results

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
