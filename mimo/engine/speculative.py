"""MTP speculative decoding, draft side: the MTP layers' passes after each target forward, and their counters.

A speculative sequence with KV for n tokens has its verified tokens t_0..t_n (t_n sampled, not fed yet). MTP layer
k at position i reads the target's pre-norm hidden state h_i and token t_{i+k+1} and predicts t_{i+k+2} (ref §9:
every layer reads the target's hidden states; the tokens chain). After each target forward the layers run in
order; layer k computes, for every speculative sequence of the step, the positions from `mtp_done[k]` (the first
whose layer-k KV was not yet computed from verified tokens) up to n - 1. A row whose token t_{i+k+1} is not known
yet takes a draft of an earlier layer (a provisional row: the next step recomputes it from the verified token, so
no rejected draft stays in the MTP layers' KV), and the row at n - 1 drafts token n + k + 1. The rows a layer
still has to recompute need the target's hidden states of up to k earlier positions, which each sequence keeps
(`DraftState.hidden`). A prefill chunk that does not reach the prompt's end computes only rows whose token is in
the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from mimo.engine.draft_graphs import DraftGraphs
from mimo.engine.kv_cache import KVCache, LayerKind
from mimo.engine.paged_attention import PagedAttention, PagedAttentionMetadata
from mimo.engine.sampling import Sampler
from mimo.engine.scheduler import ScheduledChunk
from mimo.engine.sequence import DraftState, Sequence
from mimo.engine.step_tokens import StepTokens, step_table
from mimo.engine.transfer import to_device
from mimo.models.language_model import MiMoV2ForCausalLM


class DraftOverride(Protocol):
    """Tests and benchmarks only, never served: replaces the drafts the MTP layers proposed for one sequence.

    Random weights draft almost nothing the target accepts; an override that proposes the target's own tokens
    exercises acceptance. `token_ids` are the sequence's tokens so far (prompt, generated, this step's); the drafts
    it returns are verified as deterministic proposals (q one-hot), so the output still follows the target exactly.
    """

    def __call__(self, request_id: str, token_ids: list[int], drafts: list[int]) -> list[int]: ...


class ReplayDrafts:
    """A `DraftOverride` for tests and benchmarks: proposes what a recorded run generated next (the target's own
    greedy tokens when that run was greedy), each draft kept with probability `accept_rate`, else made wrong."""

    def __init__(self, recorded: dict[str, list[int]], vocab_size: int, accept_rate: float = 1.0, seed: int = 0):
        self.recorded = recorded  # request id -> prompt + generated tokens of the recorded run
        self.vocab_size = vocab_size
        self.accept_rate = accept_rate
        self._generator = torch.Generator().manual_seed(seed)

    def __call__(self, request_id: str, token_ids: list[int], drafts: list[int]) -> list[int]:
        recorded = self.recorded.get(request_id, [])
        proposed = []
        for j, draft in enumerate(drafts):
            position = len(token_ids) + j
            token = recorded[position] if position < len(recorded) else draft
            if float(torch.rand((), generator=self._generator)) >= self.accept_rate:
                token = (token + 1) % self.vocab_size
            proposed.append(token)
        return proposed


@dataclass(slots=True)
class SpeculativeStats:
    """Counters since the engine started: acceptance rate = accepted / drafted; tokens per verify of a sequence
    (its accept length) = 1 + accepted / verifications."""

    verifications: int = 0  # sequence-steps that verified at least one draft
    draft_tokens: int = 0  # drafts verified
    accepted_tokens: int = 0  # drafts the target accepted

    def count(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts:
            self.verifications += 1
            self.draft_tokens += num_drafts
            self.accepted_tokens += num_accepted


@dataclass
class _Pending:
    """One speculative sequence of the step while the MTP layers run."""

    index: int  # its chunk in the step (row of the step's block tables)
    seq: Sequence
    state: DraftState  # before the step
    start: int  # first position the step's target forward computed
    offset: int  # that position's row in the step's hidden states
    stash_offset: int  # row of position `state.hidden_start` in the hidden-state source
    num_computed: int  # KV of the target after the step (verified tokens only)
    samples: bool
    base: int  # `known` holds the tokens of positions [base, num_known)
    known: list[int]
    drafts: list[int] = field(default_factory=list)
    draft_probs: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_known(self) -> int:
        return self.base + len(self.known)

    def token(self, position: int) -> int:
        """Token at `position`: verified, else the draft of an earlier layer."""
        if position < self.num_known:
            return self.known[position - self.base]
        return self.drafts[position - self.num_known]

    def hidden_row(self, position: int) -> int:
        if position >= self.start:
            return self.offset + position - self.start
        return self.stash_offset + position - self.state.hidden_start

    def rows(self, layer: int) -> range:
        """Positions layer `layer` computes this step."""
        done = self.state.mtp_done[layer]
        return range(done, self.num_computed if self.samples else max(done, self.verified_end(layer)))

    def verified_end(self, layer: int) -> int:
        """End of the positions whose layer-`layer` token is verified, within the target's KV."""
        return min(self.num_computed, self.num_known - 1 - layer)


class Drafter:
    """Runs the MTP layers after each target forward: their KV from verified tokens, and k drafts per sequence."""

    def __init__(self, model: MiMoV2ForCausalLM, kv_cache: KVCache, sampler: Sampler, num_layers: int,
                 sliding_window: int, device: torch.device, use_attention_kernel: bool = False):
        self.model = model
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.num_layers = num_layers
        self.sliding_window = sliding_window
        self.device = device
        self.use_attention_kernel = use_attention_kernel
        self.vocab_size = model.config.vocab_size
        self.test_draft_override: DraftOverride | None = None  # tests and benchmarks only
        self.graphs: DraftGraphs | None = None  # set by the model runner where decode steps replay CUDA graphs

    @torch.inference_mode()
    def step(self, chunks: list[ScheduledChunk], offsets: list[int], hidden: torch.Tensor,
             sampled: dict[int, tuple[list[int], int]],
             sliding_tables: tuple[torch.Tensor, torch.Tensor]) -> dict[int, DraftState]:
        """The MTP passes of one step; returns the new `DraftState` of each speculative chunk, by chunk index.

        Args:
            offsets: first row of each chunk in `hidden` `[T, H]`, the target's pre-norm hidden states.
            sampled: per sampling chunk, (its emitted tokens, drafts accepted).
            sliding_tables: the step's sliding-pool block tables `[B, width]` and lengths `[B]`, one row per chunk.
        """
        pending: list[_Pending] = []
        stashes = []
        stash_offset = hidden.shape[0]
        for index, chunk in enumerate(chunks):
            state = chunk.seq.draft
            if state is None:
                continue
            emitted, accepted = sampled.get(index, ([], 0))
            base = min(state.mtp_done)
            pending.append(_Pending(
                index, chunk.seq, state, chunk.start, offsets[index], stash_offset,
                num_computed=chunk.end - chunk.num_drafts + accepted, samples=chunk.samples, base=base,
                known=chunk.seq.token_ids[base:] + emitted,
            ))  # fmt: skip
            if state.hidden is not None:
                stashes.append(state.hidden)
                stash_offset += state.hidden.shape[0]
        if not pending:
            return {}
        source = torch.cat([hidden, *stashes]) if stashes else hidden  # [T + stashed, H]
        graph_step = None if self.graphs is None else self.graphs.prepare(pending, source, sliding_tables)
        if graph_step is not None:
            for item, drafts in zip(pending, self.graphs.replay(graph_step)):
                item.drafts = drafts
        else:
            for layer in range(self.num_layers):
                self._run_layer(layer, pending, source, sliding_tables)
        return self._new_states(pending, source)

    def _run_layer(self, layer: int, pending: list[_Pending], source: torch.Tensor,
                   sliding_tables: tuple[torch.Tensor, torch.Tensor]) -> None:
        tokens = StepTokens(self.vocab_size)
        starts, counts, chunk_rows, hidden_rows, last_rows, drafting = [], [], [], [], [], []
        for item in pending:
            rows = item.rows(layer)
            if not rows:
                continue
            tokens.add(item.seq, [item.token(i + layer + 1) for i in rows])
            hidden_rows += [item.hidden_row(i) for i in rows]
            starts.append(rows.start)
            counts.append(len(rows))
            chunk_rows.append(item.index)
            if item.samples:
                last_rows.append(len(tokens.ids) - 1)
                drafting.append(item)
        if not counts:
            return
        device = self.device
        select = to_device(chunk_rows, device)
        tables, lengths = sliding_tables
        metadata = PagedAttentionMetadata.build(
            starts, counts, {LayerKind.SLIDING: (tables.index_select(0, select), lengths.index_select(0, select))},
            self.kv_cache.block_size, self.sliding_window, device, self.use_attention_kernel,
        )  # fmt: skip
        model = self.model
        draft_hidden = model.forward_mtp(
            layer, metadata.query_positions, PagedAttention(self.kv_cache, metadata), to_device(tokens.ids, device),
            source.index_select(0, to_device(hidden_rows, device)), step_table(tokens.table_rows),
        )  # [R, H]
        if drafting:
            logits = model.compute_logits(draft_hidden.index_select(0, to_device(last_rows, device)))  # [S, V]
            self._draw(logits, drafting)

    def _draw(self, logits: torch.Tensor, drafting: list[_Pending]) -> None:
        """Each drafting sequence's next draft: the argmax (greedy requests), else a draw from q."""
        tokens = logits.argmax(dim=-1)
        rows = [j for j, item in enumerate(drafting) if not item.seq.sampling.is_greedy]
        probs = None
        if rows:
            row_index = to_device(rows, logits.device)
            probs = self.sampler.probs(logits.index_select(0, row_index), [drafting[j].seq.sampling for j in rows])
            tokens = tokens.index_copy(0, row_index, self.sampler.race(probs, [drafting[j].seq.generator
                                                                               for j in rows]))
        for j, token in enumerate(tokens.tolist()):
            drafting[j].drafts.append(token)
        for q, j in zip(probs if probs is not None else [], rows):
            drafting[j].draft_probs.append(q)

    def _new_states(self, pending: list[_Pending], source: torch.Tensor) -> dict[int, DraftState]:
        dones = [[max(item.state.mtp_done[k], item.verified_end(k)) for k in range(self.num_layers)]
                 for item in pending]
        kept = [range(min(done), item.num_computed) for item, done in zip(pending, dones)]
        rows = [item.hidden_row(i) for item, positions in zip(pending, kept) for i in positions]
        hidden = source.index_select(0, to_device(rows, self.device)).split([len(p) for p in kept]) if rows else None
        states = {}
        for j, (item, done, positions) in enumerate(zip(pending, dones, kept)):
            drafts, draft_probs = item.drafts, torch.stack(item.draft_probs) if item.draft_probs else None
            if item.samples and self.test_draft_override is not None:
                emitted = item.known[item.seq.num_tokens - item.base:]
                drafts = self.test_draft_override(item.seq.request_id, item.seq.token_ids + emitted, drafts)
                draft_probs = None
            states[item.index] = DraftState(done, positions.start, hidden[j] if positions else None, drafts,
                                            draft_probs)
        return states
