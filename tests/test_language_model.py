import pytest
import torch
from hf_reference import (
    build_hf_model,
    hf_greedy,
    hf_logits,
    mimo_greedy,
    mimo_logits,
    randomize_weights,
    tiny_hub_config,
)

from mimo.config import MiMoV2Config
from mimo.models.attention import NoCacheAttention, attention_with_sinks
from mimo.models.decoder_layer import MiMoV2DecoderLayer
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.models.layers import apply_rotary, rotary_cos_sin
from mimo.loading import hub_state_dict
from mimo.models.moe import MiMoV2MoE
from mimo.parallel.mapping import Mapping, ParallelRank

PROMPT_LEN = 40  # five times the tiny sliding window of 8


def _model(seed: int = 0, **overrides) -> MiMoV2ForCausalLM:
    model = MiMoV2ForCausalLM(MiMoV2Config.from_hf_config(tiny_hub_config(**overrides))).eval()
    randomize_weights(model, seed)
    return model


def _prompt(vocab_size: int, length: int = PROMPT_LEN, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


PARITY_CASES = {
    # full + sliding layers, sinks, dense layer 0 + MoE layers with a random correction bias
    "hybrid": {},
    # hybrid_block_size / int moe_layer_freq, grouped top-k, unnormalised scaled weights, tied head, no V scale
    "grouped-routing": {
        "num_hidden_layers": 4, "hybrid_layer_pattern": None, "hybrid_block_size": 2, "moe_layer_freq": 2,
        "n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3,
        "norm_topk_prob": False, "routed_scaling_factor": 2.5, "tie_word_embeddings": True,
        "attention_value_scale": None, "partial_rotary_factor": 1.0,
    },
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_hf_parity_logits_and_greedy(case):
    model = _model(**PARITY_CASES[case])
    hf = build_hf_model(model.config, hub_state_dict(model))
    prompt = _prompt(model.config.vocab_size)

    ours, reference = mimo_logits(model, prompt), hf_logits(hf, prompt)
    assert ours.dtype == torch.float32 and ours.shape == (PROMPT_LEN, model.config.vocab_size)
    assert reference.std() > 0.5  # weights give non-trivial logits
    assert (ours - reference).abs().max() <= 1e-4
    assert mimo_greedy(model, prompt, 32) == hf_greedy(hf, prompt, 32)


def test_hf_parity_detects_sliding_window_off_by_one():
    # The parity harness is sensitive to the window: HF with a 1-key-smaller window disagrees.
    model = _model()
    hf = build_hf_model(model.config, hub_state_dict(model))
    hf.config.sliding_window -= 1
    prompt = _prompt(model.config.vocab_size)
    assert (mimo_logits(model, prompt) - hf_logits(hf, prompt)).abs().max() > 1e-3


def test_batched_sequences_match_single_sequences():
    model = _model()
    first, second = _prompt(model.config.vocab_size, 13, seed=2), _prompt(model.config.vocab_size, 21, seed=3)
    ids = torch.tensor(first + second)
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))])
    with torch.no_grad():
        hidden = model(positions, NoCacheAttention([len(first), len(second)]), model.embed(ids))
        logits = model.compute_logits(hidden)
    torch.testing.assert_close(logits[: len(first)], mimo_logits(model, first))
    torch.testing.assert_close(logits[len(first) :], mimo_logits(model, second))


class _GrowingCache:
    """One sequence's K/V per layer, appended each step: the contract a KV-cache backend relies on."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.positions = torch.empty(0, dtype=torch.long)  # of the step's new tokens

    def attend(self, layer_idx, q, k, v, *, sliding_window, sinks, scale):
        keys = self.keys[layer_idx] = torch.cat([self.keys.get(layer_idx, k[:0]), k])
        values = self.values[layer_idx] = torch.cat([self.values.get(layer_idx, v[:0]), v])
        return attention_with_sinks(
            q, keys, values, q_pos=self.positions, k_pos=torch.arange(keys.shape[0]),
            scale=scale, sliding_window=sliding_window, sinks=sinks,
        )


def test_incremental_decode_matches_full_recompute():
    # Layers hand the backend only the new tokens, rotated at the given positions, v already scaled.
    model = _model()
    prompt = _prompt(model.config.vocab_size, 30)
    cache = _GrowingCache()
    steps = [(0, 20)] + [(i, i + 1) for i in range(20, 30)]  # prefill, then one token at a time
    with torch.no_grad():
        for start, end in steps:
            cache.positions = torch.arange(start, end)
            hidden = model(cache.positions, cache, model.embed(torch.tensor(prompt[start:end])))
            logits = model.compute_logits(hidden)
            torch.testing.assert_close(logits, mimo_logits(model, prompt[:end])[start:end], atol=1e-5, rtol=1e-5)


def test_embed_prompt_table():
    model = _model()
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    table = torch.randn(3, hidden)
    ids = torch.tensor([5, vocab + 2, 7, vocab])
    with torch.no_grad():
        embeds = model.embed(ids, table)
        weight = model.model.embed_tokens.weight
    torch.testing.assert_close(embeds, torch.stack([weight[5], table[2], weight[7], table[0]]))
    # id ranges are checked once, at admission (tests/test_engine_llm.py), not on every embed
    with pytest.raises(ValueError, match=r"prompt_table must be \[P, 32\]"):
        model.embed(ids, torch.randn(3, hidden + 1))


def test_scale_emb_scales_token_rows_only():
    model = _model(scale_emb=3.0)
    table = torch.randn(1, model.config.hidden_size)
    with torch.no_grad():
        embeds = model.embed(torch.tensor([4, model.config.vocab_size]), table)
        torch.testing.assert_close(embeds[0], 3.0 * model.model.embed_tokens.weight[4])
    torch.testing.assert_close(embeds[1], table[0])


def test_layers_hold_fused_projections_under_hub_names():
    model = MiMoV2ForCausalLM(MiMoV2Config.from_hf_config(tiny_hub_config(
        num_hidden_layers=2, hybrid_layer_pattern=[0, 1], moe_layer_freq=[0, 1], n_routed_experts=2,
        num_experts_per_tok=1, num_nextn_predict_layers=1,
    )))
    attention = ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight"]  # one GEMM for q, k and v
    norms = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    dense = ["mlp.gate_up_proj.weight", "mlp.down_proj.weight"]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.0.{n}" for n in attention + norms + dense}
    expected |= {f"model.layers.1.{n}" for n in attention + norms + ["self_attn.attention_sink_bias"]}
    expected |= {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"}
    expected |= {"model.layers.1.mlp.experts.gate_up_proj.weight", "model.layers.1.mlp.experts.down_proj.weight"}
    expected |= {f"model.mtp.layers.0.{n}" for n in attention + norms + dense + ["self_attn.attention_sink_bias"]}
    expected |= {f"model.mtp.layers.0.{n}.weight" for n in ("enorm", "hnorm", "eh_proj", "final_layernorm")}
    state = model.state_dict()
    assert set(state) == expected
    full = model.config.full_attention
    assert state["model.layers.0.self_attn.qkv_proj.weight"].shape == (
        full.num_heads * full.head_dim + full.num_kv_heads * (full.head_dim + full.v_head_dim), 32)
    moe_width = model.config.moe_intermediate_size
    assert state["model.layers.1.mlp.experts.gate_up_proj.weight"].shape == (2, 2 * moe_width, 32)  # [E, 2I, H]
    # ... and `hub_state_dict` gives them back under the split hub names the checkpoints use
    hub = set(hub_state_dict(model))
    assert "model.layers.0.self_attn.q_proj.weight" in hub and "model.layers.1.mlp.experts.1.up_proj.weight" in hub
    assert not any("qkv_proj" in name or "gate_up_proj" in name for name in hub)


def test_mtp_matches_hf_single_sliding_layer():
    """MTP draft = HF one-layer sliding dense model on eh_proj([enorm(emb); hnorm(h)]), shared embed / head."""
    model = _model(num_nextn_predict_layers=2)
    config = model.config
    prompt = _prompt(config.vocab_size, 20)
    ids = torch.tensor(prompt)
    positions = torch.arange(len(prompt))
    attn = NoCacheAttention([len(prompt)])
    with torch.no_grad():
        target_hidden = model.model(positions, attn, model.embed(ids))  # pre-final-norm [T, H]
        next_ids = torch.roll(ids, -1)
        draft = model.compute_logits(model.forward_mtp(1, positions, attn, next_ids, target_hidden))

    # The same block as a standalone HF model: layer 0 = MTP block, model.norm = final_layernorm.
    block_config = MiMoV2Config.from_hf_config(tiny_hub_config(
        num_hidden_layers=1, hybrid_layer_pattern=[1], moe_layer_freq=[0],
    ))
    mtp_prefix = "model.mtp.layers.1."
    state = hub_state_dict(model)
    block_state = {"model.embed_tokens.weight": state["model.embed_tokens.weight"],
                   "lm_head.weight": state["lm_head.weight"],
                   "model.norm.weight": state[mtp_prefix + "final_layernorm.weight"]}
    block_state |= {"model.layers.0." + name[len(mtp_prefix):]: t for name, t in state.items()
                    if name.startswith(mtp_prefix) and name.split(".")[4] not in ("enorm", "hnorm", "eh_proj",
                                                                                  "final_layernorm")}
    hf = build_hf_model(block_config, block_state)

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.layernorm_epsilon)

    with torch.no_grad():
        fused = torch.cat([rms(state["model.embed_tokens.weight"][next_ids], state[mtp_prefix + "enorm.weight"]),
                           rms(target_hidden, state[mtp_prefix + "hnorm.weight"])], dim=-1)
        block_input = fused @ state[mtp_prefix + "eh_proj.weight"].T  # [T, H]
        reference = hf(inputs_embeds=block_input[None], use_cache=False).logits[0]
    assert (draft - reference).abs().max() <= 1e-4


def test_mtp_requires_mtp_layers_and_embeds_prompt_ids_from_the_table():
    """A multimodal position's next token is its prompt-table row for the MTP layers too, as for the target."""
    model = _model(num_nextn_predict_layers=1)
    hidden = torch.randn(2, model.config.hidden_size)
    attn = NoCacheAttention([2])
    vocab = model.config.vocab_size
    table = torch.randn(6, model.config.hidden_size)
    with torch.no_grad():
        placeholder = model.forward_mtp(0, torch.arange(2), attn, torch.tensor([3, vocab + 5]), hidden, table)
        expected = model.model.mtp(0, torch.arange(2), attn, torch.stack([model.embed(torch.tensor([3]))[0],
                                                                          table[5]]), hidden)  # fmt: skip
        other_row = model.forward_mtp(0, torch.arange(2), attn, torch.tensor([3, vocab + 4]), hidden, table)
    torch.testing.assert_close(placeholder, expected)
    assert not torch.allclose(placeholder[1], other_row[1])
    with pytest.raises(ValueError, match="no MTP layers"):
        _model().forward_mtp(0, torch.arange(2), attn, torch.tensor([1, 2]), hidden)


@pytest.mark.parametrize("n_group", [1, 4])
def test_moe_matches_dense_evaluation(n_group):
    torch.manual_seed(0)
    moe = MiMoV2MoE(hidden_size=16, moe_intermediate_size=8, num_experts=8, top_k=3, n_group=n_group, topk_group=2
                    if n_group > 1 else 1, norm_topk_prob=True, routed_scaling_factor=1.5)
    randomize_weights(moe, seed=4)
    x = torch.randn(11, 16)
    with torch.no_grad():
        out = moe(x)
        scores = (x @ moe.gate.weight.T).sigmoid()  # [T, E]
        choice = scores + moe.gate.e_score_correction_bias
        if n_group > 1:
            # keep the 2 groups whose top-2 choice scores sum highest
            group_scores = choice.view(11, n_group, -1).topk(2, dim=-1).values.sum(-1)
            dropped = group_scores.argsort(dim=-1)[:, : n_group - 2]
            for t in range(11):
                for g in dropped[t].tolist():
                    choice[t, g * 2 : (g + 1) * 2] = float("-inf")
        chosen = choice.topk(3, dim=-1).indices
        expected = torch.zeros_like(x)
        for t in range(11):
            weights = scores[t, chosen[t]] / scores[t, chosen[t]].sum() * 1.5
            for w, e in zip(weights, chosen[t].tolist()):
                expected[t] += w * moe.experts(x[t : t + 1], e)[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_moe_expert_parallel_partial_sums():
    torch.manual_seed(0)
    kwargs = dict(hidden_size=16, moe_intermediate_size=8, num_experts=8, top_k=2, n_group=1, topk_group=1,
                  norm_topk_prob=True, routed_scaling_factor=1.0)
    full = MiMoV2MoE(**kwargs)
    randomize_weights(full, seed=5)
    mapping = Mapping.create(2, 2)  # two EP groups of 4 experts; no all-reduce without a process group
    shards = []
    for rank in range(2):
        shard = MiMoV2MoE(**kwargs, parallel=ParallelRank(mapping, rank))
        shard.reduce_results = False  # the test sums the partial outputs itself
        assert shard.local_experts == range(4 * rank, 4 * rank + 4)
        experts = shard.local_experts
        shard.gate.load_state_dict(full.gate.state_dict())
        shard.experts.gate_up_proj.weight.data = full.experts.gate_up_proj.weight[experts.start : experts.stop]
        shard.experts.down_proj.weight.data = full.experts.down_proj.weight[experts.start : experts.stop]
        shards.append(shard)
    x = torch.randn(9, 16)
    with torch.no_grad():
        torch.testing.assert_close(shards[0](x) + shards[1](x), full(x))


def test_partial_rotary_is_relative_and_leaves_tail():
    x = torch.randn(1, 2, 12)
    cos, sin = rotary_cos_sin(torch.tensor([5]), rotary_dim=4, base=10000.0)
    rotated = apply_rotary(x, cos, sin)
    torch.testing.assert_close(rotated[..., 4:], x[..., 4:])
    q, k = torch.randn(1, 1, 12), torch.randn(1, 1, 12)

    def score(q_pos, k_pos):
        qc, qs = rotary_cos_sin(torch.tensor([q_pos]), 4, 10000.0)
        kc, ks = rotary_cos_sin(torch.tensor([k_pos]), 4, 10000.0)
        return (apply_rotary(q, qc, qs) * apply_rotary(k, kc, ks)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))


def test_bfloat16_forward_tracks_float32():
    # Seed 1: with seed 0's weights (since the experts are packed, randomize_weights draws them in another order)
    # one token has two near-tied experts, which bf16 rounding swaps (hf_reference notes the effect).
    model = _model(seed=1)
    prompt = _prompt(model.config.vocab_size, 16)
    reference = mimo_logits(model, prompt)
    logits = mimo_logits(model.to(torch.bfloat16), prompt)
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max() < 0.25 * reference.std()


def test_decoder_layer_uses_layer_kind_geometry():
    config = MiMoV2Config.from_hf_config(tiny_hub_config())
    full, sliding = MiMoV2DecoderLayer(config, 0, "full", False), MiMoV2DecoderLayer(config, 1, "sliding", True)
    assert full.self_attn.qkv_proj.local_geometry.num_kv_heads == config.full_attention.num_kv_heads
    assert sliding.self_attn.qkv_proj.local_geometry.num_kv_heads == 2 * full.self_attn.num_kv_heads
    assert full.self_attn.attention_sink_bias is None and sliding.self_attn.sliding_window == 8
