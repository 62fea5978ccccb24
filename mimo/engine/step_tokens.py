"""Token ids of several sequences flattened into one forward, with the prompt-table rows they read."""

from __future__ import annotations

import torch

from mimo.engine.sequence import Sequence


class StepTokens:
    """Collects the ids a forward embeds; ids >= vocab_size are renumbered into the step's own prompt table.

    Each sequence's ids >= vocab_size index its own table; the step's table is the rows `[lo, hi)` each part
    reads, concatenated in order, and those ids are shifted to point into it (`MiMoV2ForCausalLM.embed`).
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.ids: list[int] = []
        self.table_rows: list[torch.Tensor] = []  # [rows, H] parts of the step's prompt table
        self._num_table_rows = 0

    def add(self, seq: Sequence, ids: list[int]) -> None:
        vocab_size = self.vocab_size
        rows = [i - vocab_size for i in ids if i >= vocab_size] if seq.prompt_table is not None else []
        if rows:
            lo, hi = min(rows), max(rows) + 1
            self.table_rows.append(seq.prompt_table[lo:hi])
            shift = self._num_table_rows - lo
            ids = [i + shift if i >= vocab_size else i for i in ids]
            self._num_table_rows += hi - lo
        self.ids += ids


def step_table(rows: list[torch.Tensor]) -> torch.Tensor | None:
    """The step's prompt table `[P, H]` from its parts (`StepTokens.table_rows`), None without any."""
    return (rows[0] if len(rows) == 1 else torch.cat(rows)) if rows else None
