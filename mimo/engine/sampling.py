"""Per-request sampling parameters and the batched sampler."""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import torch

from mimo.engine.transfer import to_device


class InvalidRequestError(ValueError):
    """A request the engine refuses; the message names the offending field or input."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples and when it stops.

    temperature 0 (or top_k 1) is greedy: exact argmax of the logits. top_k 0 and top_p 1.0 disable those filters.
    `seed` gives the request its own random stream, so its samples do not depend on what it is batched with.
    The `end_id` token ends the request and is not reported; `stop_token_sequences` end it and are reported.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    end_id: int | None = None
    stop_token_sequences: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        self._coerce("max_tokens", numbers.Integral, int, lambda x: x >= 1, "an int >= 1")
        self._coerce("temperature", numbers.Real, float, lambda x: x >= 0.0, "a number >= 0")
        self._coerce("top_k", numbers.Integral, int, lambda x: x >= 0, "an int >= 0 (0 = off)")
        self._coerce("top_p", numbers.Real, float, lambda x: 0.0 < x <= 1.0, "a number in (0, 1]")
        if self.seed is not None:
            self._coerce("seed", numbers.Integral, int, lambda x: 0 <= x < 2**63, "None or an int in [0, 2**63)")
        if self.end_id is not None:
            self._coerce("end_id", numbers.Integral, int, lambda x: x >= 0, "None or an int >= 0")
        try:
            stops = tuple(tuple(operator.index(t) for t in stop) for stop in self.stop_token_sequences)
        except TypeError:
            stops = None
        if stops is None or not all(stop and min(stop) >= 0 for stop in stops):
            raise InvalidRequestError("SamplingParams.stop_token_sequences must be non-empty lists of token ids >= 0, "
                                      f"got {self.stop_token_sequences!r}")
        object.__setattr__(self, "stop_token_sequences", stops)

    def _coerce(self, field: str, kind: type, cast: type, valid, expected: str) -> None:
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, kind) or not valid(cast(value)):
            raise InvalidRequestError(f"SamplingParams.{field} must be {expected}, got {value!r}")
        object.__setattr__(self, field, cast(value))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class Sampler:
    """Samples one token per row of a logits batch, each row with its own `SamplingParams`.

    Sampling uses the exponential race (argmax of p / E, E ~ Exp(1)), equivalent to drawing from p; the noise of a
    seeded row comes from that request's generator only, so its draws are independent of the batch composition.
    """

    def __init__(self, generator: torch.Generator):
        self.generator = generator  # stream of the unseeded non-greedy rows

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> torch.Tensor:
        """logits `[N, V]` float32, one params and one generator (None = unseeded) per row -> token ids `[N]`."""
        tokens = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if not rows:
            return tokens
        device = logits.device
        row_index = to_device(rows, device)
        temperature = to_device([params[i].temperature for i in rows], device, logits.dtype)
        scaled = logits.index_select(0, row_index) / temperature[:, None]  # [R, V]
        if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in rows):
            top_k = to_device([params[i].top_k or logits.shape[-1] for i in rows], device)
            top_p = to_device([params[i].top_p for i in rows], device, logits.dtype)
            scaled = _mask_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
        if unseeded:
            noise_rows = torch.empty(len(unseeded), probs.shape[-1], device=device, dtype=probs.dtype)
            noise[to_device(unseeded, device)] = noise_rows.exponential_(generator=self.generator)
        for j, i in enumerate(rows):
            if generators[i] is not None:
                noise[j].exponential_(generator=generators[i])
        return tokens.index_copy(0, row_index, probs.div_(noise).argmax(dim=-1))


def _mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sets logits outside each row's top-k, then outside its top-p nucleus, to -inf. logits `[R, V]`, k/p `[R]`."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    drop = rank[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # keep a token while the mass before it is below p, so the most likely token always survives
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
