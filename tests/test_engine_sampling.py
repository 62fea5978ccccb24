"""SamplingParams validation and the batched sampler."""

import numpy as np
import pytest
import torch

from mimo.engine.sampling import InvalidRequestError, Sampler, SamplingParams

VOCAB = 50


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": -3}, "seed"),
    ({"end_id": -1}, "end_id"),
    ({"stop_token_sequences": [[]]}, "stop_token_sequences"),
    ({"stop_token_sequences": [["a"]]}, "stop_token_sequences"),
])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_params_accept_numpy_scalars_and_normalise_stop_sequences():
    params = SamplingParams(max_tokens=np.int32(4), temperature=np.float32(0.5), stop_token_sequences=[[1, 2], [3]])
    assert params.max_tokens == 4 and type(params.max_tokens) is int
    assert params.stop_token_sequences == ((1, 2), (3,))
    assert SamplingParams(temperature=0.0).is_greedy and SamplingParams(top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy


def test_greedy_rows_are_exact_argmax():
    logits = torch.randn(4, VOCAB, generator=seeded(0))
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=2.0)] * 2
    sampler = Sampler(seeded(1))
    assert torch.equal(sampler(logits, params, [None] * 4), logits.argmax(-1))


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(5, VOCAB, generator=seeded(0))
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3), SamplingParams(top_k=5, seed=3),
              SamplingParams(temperature=0.8)]

    def draws(rows: list[int], sampler_seed: int) -> list[int]:
        """Four consecutive samples of `target` (logits row 0) batched with `rows` of `others`."""
        gen = seeded(target.seed)
        other_gens = {i: seeded(others[i].seed) if others[i].seed is not None else None for i in rows}
        sampler = Sampler(seeded(sampler_seed))
        batch = torch.cat([logits[:1], logits[1:][rows]])
        out = []
        for _ in range(4):
            tokens = sampler(batch, [target] + [others[i] for i in rows], [gen] + [other_gens[i] for i in rows])
            out.append(int(tokens[0]))
        return out

    solo = draws([], 0)
    assert draws([0, 1, 2, 3], 5) == solo
    assert draws([3, 2], 9) == solo
    assert draws([1], 1) == solo


def test_top_k_and_top_p_limit_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(400, 1)
    probs = logits[0].softmax(-1)
    sampler = Sampler(seeded(0))
    top_k = sampler(logits, [SamplingParams(top_k=2)] * 400, [None] * 400)
    assert set(top_k.tolist()) == {0, 1}
    # nucleus 0.9: tokens 0 and 1 hold probs[:2].sum() < 0.9, so token 2 is the last kept
    assert probs[:2].sum() < 0.9 < probs[:3].sum()
    top_p = sampler(logits, [SamplingParams(top_p=0.9)] * 400, [None] * 400)
    assert set(top_p.tolist()) == {0, 1, 2}
    low_temperature = sampler(logits, [SamplingParams(temperature=0.05)] * 400, [None] * 400)
    assert set(low_temperature.tolist()) == {0}


def test_unseeded_rows_follow_the_engine_generator():
    logits = torch.zeros(8, VOCAB)
    params = [SamplingParams(temperature=1.0)] * 8
    first = Sampler(seeded(11))(logits, params, [None] * 8)
    again = Sampler(seeded(11))(logits, params, [None] * 8)
    other = Sampler(seeded(12))(logits, params, [None] * 8)
    assert torch.equal(first, again) and not torch.equal(first, other)
