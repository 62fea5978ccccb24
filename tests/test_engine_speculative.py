"""MTP speculative decoding in LLMEngine on a tiny random model: greedy tokens equal MTP off, rejected drafts leave
no trace in any KV pool, sampled outputs follow the target distribution.

Random weights draft almost nothing the target accepts, so each behaviour is checked in three regimes: the MTP
layers' own drafts ("mtp", nearly all rejected), the recorded greedy tokens of an MTP-off run proposed by the
test-only override ("replay": every draft accepted, bonus tokens), and those tokens each made wrong with
probability 0.4 ("partial": sequences at different accept lengths in one batch).
"""

import dataclasses
from collections import Counter

import pytest
import torch
from hf_reference import randomize_weights, tiny_hub_config

from mimo.config import MiMoV2Config
from mimo.engine import EngineConfig, LLMEngine, SamplingParams, generate
from mimo.engine.sampling import Sampler
from mimo.engine.speculative import ReplayDrafts
from mimo.models.attention import NoCacheAttention
from mimo.models.language_model import MiMoV2ForCausalLM

VOCAB, HIDDEN, WINDOW, BLOCK = 96, 32, 8, 4
GREEDY = SamplingParams(max_tokens=14, temperature=0.0)
REGIMES = ("mtp", "replay", "partial")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def model() -> MiMoV2ForCausalLM:
    # sliding window 8, blocks of 4, chunks of at most 6: long prompts wrap the rings
    model = MiMoV2ForCausalLM(MiMoV2Config.from_hf_config(tiny_hub_config(num_nextn_predict_layers=3)))
    randomize_weights(model, seed=0)
    return model.requires_grad_(False).eval()


def make_engine(model, k: int, override=None, **overrides) -> LLMEngine:
    config = dict(max_num_seqs=8, max_num_batched_tokens=20, max_prefill_chunk=6, block_size=BLOCK, max_model_len=64,
                  num_full_blocks=128, seed=0, num_speculative_tokens=k)
    return LLMEngine(model, EngineConfig(**(config | overrides)), test_draft_override=override)


def prompt(length: int, salt: int) -> list[int]:
    return [(salt * 31 + 7 * i) % VOCAB for i in range(length)]


def table(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed))


def override_for(regime: str, recorded: dict[str, list[int]]):
    """The regime's draft override: None (the MTP layers' own drafts) or a replay of `recorded`."""
    if regime == "mtp":
        return None
    return ReplayDrafts(recorded, VOCAB, accept_rate=1.0 if regime == "replay" else 0.6, seed=3)


def run(engine: LLMEngine, requests: dict, arrivals: dict[int, list[str]] | None = None,
        abort: tuple[str, int] | None = None) -> dict[str, tuple[list[int], str]]:
    """Runs `requests` (id -> (prompt, params, table)); `arrivals[s]` join before step s; `abort` = (id, after n
    tokens). Returns id -> (tokens, finish reason)."""
    arrivals = arrivals or {0: list(requests)}
    tokens = {rid: [] for rid in requests}
    reasons = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for rid in arrivals.get(step, []):
            engine.add_request(rid, *requests[rid])
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        if abort is not None and len(tokens[abort[0]]) >= abort[1] and abort[0] not in reasons:
            assert engine.abort(abort[0])
        step += 1
    return {rid: (tokens[rid], reasons[rid]) for rid in requests}


def assert_all_blocks_free(engine: LLMEngine) -> None:
    for pool in engine.kv_stats().values():
        assert pool["free_blocks"] == pool["total_blocks"]


def mixed_requests() -> dict:
    """Text prompts shorter and longer than the window and the chunk, two multimodal ones (table rows across a
    chunk boundary), one that opts out of speculation."""
    image = prompt(4, 5) + [VOCAB + r for r in range(5)] + prompt(6, 6)
    audio = [VOCAB + r for r in range(7)] + prompt(3, 8)
    return {
        "short": (prompt(3, 1), GREEDY, None),
        "long": (prompt(21, 2), SamplingParams(max_tokens=11, temperature=0.0), None),
        "image": (image, GREEDY, table(5, 0)),
        "audio": (audio, SamplingParams(max_tokens=9, temperature=0.0), table(7, 1)),
        "opt_out": (prompt(9, 3), SamplingParams(max_tokens=12, temperature=0.0, speculative=False), None),
        "late": (prompt(13, 4), GREEDY, None),
        "later": (prompt(2, 7), SamplingParams(max_tokens=7, temperature=0.0), None),
    }


ARRIVALS = {0: ["short", "long", "image", "audio", "opt_out"], 3: ["late"], 6: ["later"]}


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_tokens_equal_mtp_off(model, k, regime):
    requests = mixed_requests()
    expected = run(make_engine(model, 0), requests, ARRIVALS)
    recorded = {rid: requests[rid][0] + tokens for rid, (tokens, _) in expected.items()}
    engine = make_engine(model, k, override_for(regime, recorded))
    assert run(engine, requests, ARRIVALS) == expected
    assert_all_blocks_free(engine)
    stats = engine.speculative_stats()
    assert stats["draft_tokens"] >= stats["verifications"] > 0
    if regime == "replay":
        assert stats["accepted_tokens"] == stats["draft_tokens"]
    elif regime == "partial":
        assert 0 < stats["accepted_tokens"] < stats["draft_tokens"]


@pytest.mark.parametrize("regime", ["mtp", "partial"])
def test_preempted_speculative_sequences_recompute_their_mtp_state(model, preemptions, regime):
    requests = {f"r{i}": (prompt(n, i), SamplingParams(max_tokens=10 + i % 5, temperature=0.0), None)
                for i, n in enumerate([5, 17, 9, 24, 3, 12])}
    small_kv = {"num_full_blocks": 18}  # 6 sequences of up to 38 tokens: preemption
    expected = run(make_engine(model, 0, **small_kv), requests)
    recorded = {rid: requests[rid][0] + tokens for rid, (tokens, _) in expected.items()}
    preemptions.clear()
    engine = make_engine(model, 3, override_for(regime, recorded), **small_kv)
    assert run(engine, requests) == expected
    assert preemptions
    assert_all_blocks_free(engine)


def test_stops_inside_an_accepted_run_drop_what_follows(model):
    """Every draft accepted (k = 3: runs of 4 tokens): end_id, a stop sequence and max_tokens falling inside a run."""
    p = prompt(11, 3)
    reference = generate(make_engine(model, 0), [p], SamplingParams(max_tokens=16, temperature=0.0))[0]
    # a token that did not occur before (an unambiguous stop), not the last of the 4-token run [4r + 1, 4r + 4]
    j = next(i for i in range(3, 16) if reference[i] not in reference[:i] and i % 4 != 0)
    params = {
        "end_id": SamplingParams(max_tokens=16, temperature=0.0, end_id=reference[j]),
        "stop_seq": SamplingParams(max_tokens=16, temperature=0.0, stop_token_sequences=[reference[j - 1:j + 1]]),
        "length": SamplingParams(max_tokens=j, temperature=0.0),
    }
    requests = {rid: (p, sp, None) for rid, sp in params.items()}
    expected = run(make_engine(model, 0), requests)
    assert expected["end_id"] == (reference[:j], "stop") and expected["length"] == (reference[:j], "length")
    engine = make_engine(model, 3, ReplayDrafts({rid: p + reference for rid in requests}, VOCAB))
    tokens_per_step = {rid: [] for rid in requests}
    for rid, (ids, sp, _) in requests.items():
        engine.add_request(rid, ids, sp)
    while engine.has_unfinished():
        for out in engine.step():
            tokens_per_step[out.request_id].append(out.new_token_ids)
    assert {rid: sum(steps, []) for rid, steps in tokens_per_step.items()} == {
        rid: tokens for rid, (tokens, _) in expected.items()}
    stats = engine.speculative_stats()
    assert stats["accepted_tokens"] == stats["draft_tokens"]
    # the first token, then runs of 4 (3 accepted drafts + bonus); the stop's run ends at the stop
    for rid, in_last_run in (("end_id", (j - 1) % 4), ("stop_seq", (j - 1) % 4 + 1)):
        steps = [len(s) for s in tokens_per_step[rid]]
        assert steps == [1] + [4] * (len(steps) - 2) + [in_last_run] and in_last_run < 4, rid
    assert_all_blocks_free(engine)


def test_abort_of_a_speculative_request_frees_its_kv_at_once(model):
    requests = {"kept": (prompt(7, 1), GREEDY, None), "aborted": (prompt(13, 2), GREEDY, table(2, 0))}
    expected = run(make_engine(model, 0), requests)
    engine = make_engine(model, 2, ReplayDrafts({rid: requests[rid][0] + expected[rid][0] for rid in requests}, VOCAB))
    outputs = run(engine, requests, abort=("aborted", 4))
    assert outputs["kept"] == expected["kept"]
    tokens, reason = outputs["aborted"]
    assert reason == "cancelled" and tokens == expected["aborted"][0][:len(tokens)] and len(tokens) >= 4
    assert_all_blocks_free(engine)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model):
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_k=40, top_p=0.95, seed=1234)
    p = prompt(10, 4)
    solo = generate(make_engine(model, 2), [p], seeded)[0]
    assert generate(make_engine(model, 2, seed=99), [p], seeded)[0] == solo
    neighbours = [prompt(n, n) for n in (3, 20, 7)]
    params = [SamplingParams(max_tokens=9, temperature=0.8), GREEDY, SamplingParams(max_tokens=12, seed=7)]
    assert generate(make_engine(model, 2, seed=7), neighbours + [p], params + [seeded])[-1] == solo
    other_seed = SamplingParams(max_tokens=12, temperature=1.0, top_k=40, top_p=0.95, seed=4321)
    assert generate(make_engine(model, 2), [p], other_seed)[0] != solo


class RecordingAttention(NoCacheAttention):
    """No-cache attention that keeps every layer's k / v (the KV a cache would hold)."""

    def __init__(self, seq_lens):
        super().__init__(seq_lens)
        self.kv = {}

    def attend(self, layer_idx, q, k, v, **kwargs):
        self.kv[layer_idx] = (k, v)
        return super().attend(layer_idx, q, k, v, **kwargs)


def cached_kv(engine: LLMEngine, seq, layer: int, positions: range) -> torch.Tensor:
    """k and v of `positions` of `seq` in `layer`'s pool, concatenated: [len(positions), Hk, D + Dv]."""
    cache = engine.runner.kv_cache
    kind = cache.kind(layer)
    blocks = seq.block_tables[kind]
    slots = torch.tensor([blocks[(p // BLOCK) % len(blocks)] * BLOCK + p % BLOCK for p in positions])
    k, v = cache.gather(layer, slots)
    return torch.cat([k, v], dim=-1)


def test_rollback_leaves_every_pool_as_a_run_without_speculation(model):
    """After each step of a speculative run with rejections: the full layers' KV of every token, the sliding rings'
    window, and the full pool's free blocks equal those of an MTP-off run at the same length; each MTP layer's KV
    equals a recompute from the verified tokens (target hidden states of the whole sequence, no cache)."""
    k, num_layers = 3, model.config.num_hidden_layers
    p = prompt(20, 9)
    params = SamplingParams(max_tokens=30, temperature=0.0)
    plain, speculative = make_engine(model, 0), None
    reference = generate(plain, [p], params)[0]
    plain.add_request("r", p, params)
    speculative = make_engine(model, k, ReplayDrafts({"r": p + reference}, VOCAB, accept_rate=0.6, seed=1))
    speculative.add_request("r", p, params)
    compared = rejected_steps = 0
    while speculative.has_unfinished():
        before = speculative.speculative_stats()
        speculative.step()
        after = speculative.speculative_stats()
        rejected_steps += after["draft_tokens"] - before["draft_tokens"] > after["accepted_tokens"] - before[
            "accepted_tokens"]
        seq = speculative._sequences.get("r")
        if seq is None:
            break
        n = seq.num_computed_tokens
        while (plain_seq := plain._sequences["r"]).num_computed_tokens < n:
            plain.step()
        assert plain_seq.num_computed_tokens == n and plain_seq.token_ids == seq.token_ids
        for layer in range(num_layers):
            window = range(0, n) if model.config.layer_types[layer] == "full" else range(max(0, n - WINDOW), n)
            torch.testing.assert_close(cached_kv(speculative, seq, layer, window),
                                       cached_kv(plain, plain_seq, layer, window), rtol=1e-5, atol=1e-6)
        assert speculative.kv_stats()["full"] == plain.kv_stats()["full"]
        # the MTP layers' KV of the verified positions, recomputed from scratch
        ids = torch.tensor(seq.token_ids)
        hidden = model.model(torch.arange(n), NoCacheAttention([n]), model.embed(ids[:n]))  # [n, H] pre-norm
        for j, done in enumerate(seq.draft.mtp_done):
            assert done == min(n, seq.num_tokens - 1 - j)  # every position whose token j + 1 ahead is verified
            attn = RecordingAttention([done])
            model.forward_mtp(j, torch.arange(done), attn, ids[1 + j:done + 1 + j], hidden[:done])
            rows = range(max(0, done - WINDOW), done)
            recomputed = torch.cat(attn.kv[num_layers + j], dim=-1)[rows.start:]
            torch.testing.assert_close(cached_kv(speculative, seq, num_layers + j, rows), recomputed,
                                       rtol=1e-5, atol=1e-6)
        compared += 1
    assert compared > 5 and rejected_steps > 0
    stats = speculative.speculative_stats()
    assert 0 < stats["accepted_tokens"] < stats["draft_tokens"]


@pytest.mark.parametrize(("k", "overrides", "message"), [
    (4, {}, "num_speculative_tokens=4 needs 4 MTP layers, the model has 3"),
    (-1, {}, "num_speculative_tokens must be an int >= 0"),
    (3, {"max_prefill_chunk": 3}, "max_prefill_chunk=3 is below the 1 \\+ num_speculative_tokens = 4"),
])
def test_bad_speculative_config(model, k, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_engine(model, k, **overrides)


def test_override_needs_speculation(model):
    with pytest.raises(ValueError, match="test_draft_override needs EngineConfig.num_speculative_tokens > 0"):
        make_engine(model, 0, ReplayDrafts({}, VOCAB))


TINY_VOCAB, CHI_PROMPT, CHI_TOKENS, CHI_RUNS = 8, [1, 2, 3], 4, 3000


@pytest.fixture(scope="module")
def tiny_vocab_model() -> MiMoV2ForCausalLM:
    model = MiMoV2ForCausalLM(MiMoV2Config.from_hf_config(tiny_hub_config(vocab_size=TINY_VOCAB,
                                                                          num_nextn_predict_layers=2)))
    randomize_weights(model, seed=1)
    return model.requires_grad_(False).eval()


def next_token_probs(model, prefixes: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """The target distribution after each prefix (no cache), under `params`' temperature / top-k / top-p: [N, V]."""
    lengths = [len(p) for p in prefixes]
    ends = torch.tensor(lengths).cumsum(0) - 1
    positions = torch.cat([torch.arange(n) for n in lengths])
    hidden = model(positions, NoCacheAttention(lengths), model.embed(torch.tensor(sum(prefixes, []))))
    logits = model.compute_logits(hidden[ends])
    return Sampler(torch.Generator()).probs(logits, [params] * len(prefixes))


def exact_joint(model, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(first CHI_TOKENS generated tokens) by the chain rule over every prefix."""
    joint = {(): 1.0}
    for _ in range(CHI_TOKENS):
        prefixes = list(joint)
        probs = next_token_probs(model, [CHI_PROMPT + list(p) for p in prefixes], params).tolist()
        joint = {p + (t,): joint[p] * row[t] for p, row in zip(prefixes, probs) for t in range(TINY_VOCAB)}
    return joint


def chi_square_p_value(counts: dict[tuple[int, ...], int], expected: dict[tuple[int, ...], float]) -> float:
    """Goodness of fit of `counts` (N samples) to `expected` probabilities; cells expecting < 5 pooled into one."""
    n = sum(counts.values())
    cells = sorted(expected, key=expected.get)
    pooled_cells = []
    while cells and (pooled_cells and sum(n * expected[c] for c in pooled_cells) < 5 or n * expected[cells[0]] < 5):
        pooled_cells.append(cells.pop(0))
    observed = [counts.get(c, 0) for c in cells] + [sum(counts.get(c, 0) for c in pooled_cells)]
    wanted = [n * expected[c] for c in cells] + [n * sum(expected[c] for c in pooled_cells)]
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, wanted))
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def greedy_chain_override(model, params: SamplingParams):
    """Deterministic drafts: the target's most likely token after the prefix, chained (0 past the tabled length)."""
    table = {}
    prefixes = [()]
    for _ in range(CHI_TOKENS):
        probs = next_token_probs(model, [CHI_PROMPT + list(p) for p in prefixes], params)
        table.update(zip(prefixes, probs.argmax(-1).tolist()))
        prefixes = [p + (t,) for p in prefixes for t in range(TINY_VOCAB)]

    def propose(request_id, token_ids, drafts):
        generated = tuple(token_ids[len(CHI_PROMPT):])
        proposed = []
        for _ in drafts:
            proposed.append(table.get(generated, 0))
            generated += (proposed[-1],)
        return proposed

    return propose


@pytest.mark.parametrize(("regime", "params"), [
    ("off", SamplingParams(max_tokens=CHI_TOKENS, temperature=1.0)),
    ("mtp", SamplingParams(max_tokens=CHI_TOKENS, temperature=1.0)),
    ("greedy_chain", SamplingParams(max_tokens=CHI_TOKENS, temperature=0.5, top_k=5, top_p=0.95)),
])
def test_sampled_outputs_follow_the_target_distribution(tiny_vocab_model, regime, params):
    """Seeded runs on an 8-token vocabulary: the joint frequency of the first 4 tokens fits the target's exact
    distribution (chi-square, p > 1e-3), with MTP off, with k = 2 drafts of the MTP layers (q: their
    distribution), and with deterministic drafts (the target's argmax chain: most accepted, bonus tokens)."""
    model = tiny_vocab_model
    k = 0 if regime == "off" else 2
    override = greedy_chain_override(model, params) if regime == "greedy_chain" else None
    engine = LLMEngine(model, EngineConfig(
        max_num_seqs=CHI_RUNS, max_num_batched_tokens=4 * CHI_RUNS, block_size=4, max_model_len=8,
        num_full_blocks=2 * CHI_RUNS, seed=0, num_speculative_tokens=k), test_draft_override=override)
    for i in range(CHI_RUNS):
        engine.add_request(f"s{i}", CHI_PROMPT, dataclasses.replace(params, seed=1000 * k + i))
    tokens = {f"s{i}": [] for i in range(CHI_RUNS)}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    counts = Counter(tuple(t) for t in tokens.values())
    assert chi_square_p_value(counts, exact_joint(model, params)) > 1e-3
    stats = engine.speculative_stats()
    if k:
        assert stats["draft_tokens"] > stats["verifications"] > 0  # chains of 2 drafts verified
        rate = stats["accepted_tokens"] / stats["draft_tokens"]
        assert 0.2 < rate < 0.9 if regime == "mtp" else rate > 0.45
