"""The language side's plan of a request, before any encoder runs.

`MiMoProcessor.process(decode=False)` gives the prompt with every placeholder run expanded and each item's
layout (token count, grid, video timestamps and units) from the raw bytes alone (image headers, container probes;
the audio samples counted, not turned into a mel), by the same rules the full preprocessing uses. The plan adds what
the handoff needs: the prompt-table ids (`vocab_size + row`), each item's metadata for its encode request, its first
row in the prompt table, and the bytes its landing slice takes.
"""

from __future__ import annotations

from dataclasses import dataclass

from mimo.epd.metadata import ItemMetadata, content_hash
from mimo.processing.processor import ContextBudget, MiMoProcessor


@dataclass(frozen=True, slots=True)
class PlannedItem:
    metadata: ItemMetadata  # sent with the item's bytes; the encoder checks it
    data: bytes  # the raw encoded file (what the encode request carries, never patches or a mel)
    first_row: int  # its rows are prompt-table rows [first_row, first_row + metadata.num_tokens)


@dataclass(frozen=True, slots=True)
class RequestPlan:
    input_ids: list[int]  # what mimo_llm gets: pad tokens replaced by vocab_size + row
    items: list[PlannedItem]  # in prompt order

    @property
    def total_rows(self) -> int:
        return sum(item.metadata.num_tokens for item in self.items)

    def rows_per_item(self) -> list[int]:
        return [item.metadata.num_tokens for item in self.items]


def plan_request(processor: MiMoProcessor, messages: list[dict], budget: ContextBudget | None = None,
                 **render) -> RequestPlan:  # fmt: skip
    """The plan of `messages`; refused (ProcessingError) exactly where the full preprocessing would refuse them.

    `render`: `MiMoProcessor.process` keywords (enable_thinking, add_generation_prompt, tools).
    """
    prompt = processor.process(messages, budget=budget, decode=False, **render)
    table = processor.assign_prompt_table_ids(prompt)
    items, row = [], 0
    for item, part in zip(prompt.items, prompt.media):
        metadata = ItemMetadata.of(item, content_hash(part.modality, part.data, processor.config), processor.config)
        items.append(PlannedItem(metadata, part.data, row))
        row += item.num_tokens
    return RequestPlan(table.input_ids, items)
