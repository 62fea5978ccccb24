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
    `speculative` False opts the request out of MTP drafting where the engine drafts (same tokens when greedy).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    end_id: int | None = None
    stop_token_sequences: tuple[tuple[int, ...], ...] = ()
    speculative: bool = True

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
        if not isinstance(self.speculative, bool):
            raise InvalidRequestError(f"SamplingParams.speculative must be a bool, got {self.speculative!r}")

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
        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if not rows:
            return logits.argmax(dim=-1)
        if len(rows) == len(params):
            return self.race_logits(self.filtered_logits(logits, params), generators)
        row_index = to_device(rows, logits.device)
        sampled = self.race_logits(self.filtered_logits(logits.index_select(0, row_index), [params[i] for i in rows]),
                                   [generators[i] for i in rows])  # fmt: skip
        return logits.argmax(dim=-1).index_copy(0, row_index, sampled)

    def filtered_logits(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """The logits each row samples from, up to a constant: temperature-scaled, -inf outside top-k and top-p."""
        device = logits.device
        temperature = to_device([p.temperature for p in params], device, logits.dtype)
        scaled = logits / temperature[:, None]  # [R, V]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            top_k = to_device([p.top_k or logits.shape[-1] for p in params], device)
            top_p = to_device([p.top_p for p in params], device, logits.dtype)
            scaled = _mask_top_k_top_p(scaled, top_k, top_p)
        return scaled

    def probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """The distribution each row samples from (temperature, then top-k and top-p): `[R, V]`, non-greedy rows."""
        return self.filtered_logits(logits, params).softmax(dim=-1)

    def race(self, weights: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One index per row of `weights` `[R, V]` (>= 0, not necessarily normalised), drawn in proportion to them."""
        return (weights / self._exponential_noise(weights, generators)).argmax(dim=-1)

    def race_logits(self, logits: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """`race(logits.softmax(-1))` without the softmax (a slow single-block reduction over a 152k vocabulary):
        argmax p / E = argmax (logits - log E), from the same noise draws."""
        return (logits - self._exponential_noise(logits, generators).log_()).argmax(dim=-1)

    def _exponential_noise(self, like: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Exp(1) noise shaped as `like` `[R, V]`: a seeded row's from its own generator, the others' from the
        engine's stream."""
        if all(g is None for g in generators):
            return torch.empty_like(like).exponential_(generator=self.generator)
        noise = torch.empty_like(like)
        unseeded = [j for j, g in enumerate(generators) if g is None]
        if unseeded:
            noise_rows = torch.empty(len(unseeded), like.shape[-1], device=like.device, dtype=like.dtype)
            noise[to_device(unseeded, like.device)] = noise_rows.exponential_(generator=self.generator)
        for j, generator in enumerate(generators):
            if generator is not None:
                noise[j].exponential_(generator=generator)
        return noise

    def verify(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
               drafts: list[list[int]], draft_probs: list[torch.Tensor | None]) -> list[tuple[list[int], int]]:
        """Speculative verification: which drafts of each sequence the target accepts, and the token after them.

        Sequence i owns `len(drafts[i]) + 1` consecutive rows of `logits` `[R, V]` (float32): the target's logits
        after its last verified token and after each of its drafts. Greedy sequences accept drafts while they equal
        the target's argmax, then take the argmax. The others accept draft x with probability min(1, p(x) / q(x))
        (p: the target's distribution under the request's temperature / top-k / top-p; q: `draft_probs[i]`, the
        rows the drafts were drawn from, None for deterministic drafts: q one-hot) and, at the first rejection,
        draw from normalize(max(p - q, 0)), else the bonus token from p: the emitted tokens follow p exactly. A
        sampled sequence with k drafts draws k uniforms and one race per step, whatever it accepts, from its own
        generator. Returns per sequence (the accepted drafts followed by the corrected or bonus token, accepted).
        """
        device = logits.device
        starts = [0]
        for d in drafts:
            starts.append(starts[-1] + len(d) + 1)
        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        results: list[tuple[list[int], int]] = [([], 0)] * len(drafts)
        if greedy:
            argmax = logits.argmax(dim=-1).tolist()
            for i in greedy:
                target = argmax[starts[i]:starts[i + 1]]
                accepted = next((j for j, d in enumerate(drafts[i]) if d != target[j]), len(drafts[i]))
                results[i] = (drafts[i][:accepted] + [target[accepted]], accepted)
        for i in (i for i, p in enumerate(params) if not p.is_greedy):
            results[i] = self._verify_sampled(logits[starts[i]:starts[i + 1]], params[i], generators[i], drafts[i],
                                              draft_probs[i])
        return results

    def _verify_sampled(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                        drafts: list[int], draft_probs: torch.Tensor | None) -> tuple[list[int], int]:
        k = len(drafts)
        p = self.probs(logits, [params] * (k + 1))  # [k + 1, V]
        accepted = 0
        if k:
            rows = torch.arange(k, device=logits.device)
            draft_ids = to_device(drafts, logits.device)
            p_draft = p[rows, draft_ids]  # [k]
            q_draft = torch.ones_like(p_draft) if draft_probs is None else draft_probs[rows, draft_ids]
            u = torch.rand(k, device=logits.device, dtype=p.dtype, generator=generator or self.generator)
            accept = (u * q_draft < p_draft).tolist()  # u < p / q without dividing by a q of 0
            accepted = accept.index(False) if False in accept else k
        if accepted < k:
            if draft_probs is None:
                residual = p[accepted].index_fill(0, draft_ids[accepted], 0.0)  # max(p - onehot, 0)
            else:
                residual = (p[accepted] - draft_probs[accepted]).clamp_(min=0.0)
            # all zero only through rounding (p == q): then p itself, without a host sync
            weights = torch.where(residual.sum() > 0, residual, p[accepted])
        else:
            weights = p[k]
        token = int(self.race(weights[None], [generator])[0])
        return drafts[:accepted] + [token], accepted


def _mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sets logits outside each row's top-k, then outside its top-p nucleus, to -inf. logits `[R, V]`, k/p `[R]`."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    drop = rank[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # keep a token while the mass before it is below p, so the most likely token always survives
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
