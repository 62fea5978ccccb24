"""Language model loaded from tiny hub checkpoints (split bf16, fused bf16, fused FP8) vs transformers' MiMoV2Flash.

HF is built on exactly the weights our layers hold (dequantized, under the split hub names), so this checks the
loading path and the layers' fused GEMMs end to end: any misplaced fused row, wrong scale block or mis-routed
tensor changes the logits. (Other TPs: tests/test_tensor_parallel.py, against this one-process model.)
"""

import pytest
import torch
from tokenizers import Tokenizer

from builders.tiny import build_checkpoint
from hf_reference import build_hf_model, hf_greedy, hf_logits, mimo_greedy, mimo_logits
from mimo.loading import hub_state_dict, load_language_model
from mimo.models.linear import ParallelLinear

PROMPT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun by the river."


@pytest.fixture(scope="module")
def prompt_ids(checkpoints):
    ids = Tokenizer.from_file(str(checkpoints["split"] / "tokenizer.json")).encode(PROMPT).ids
    assert len(ids) > 16  # longer than the sliding window
    return ids


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {
        "split": build_checkpoint(root / "split", layout="split"),
        "fused": build_checkpoint(root / "fused", layout="fused"),
        "fused_fp8": build_checkpoint(root / "fused_fp8", layout="fused", fp8=True),
    }


@pytest.mark.parametrize("variant", ["split", "fused", "fused_fp8"])
def test_logits_and_greedy_match_transformers(checkpoints, prompt_ids, variant):
    model = load_language_model(checkpoints[variant], torch.float32, "cpu")
    reference = build_hf_model(model.config, hub_state_dict(model))
    ours, theirs = mimo_logits(model, prompt_ids), hf_logits(reference, prompt_ids)
    assert ours.shape == (len(prompt_ids), model.config.vocab_size)
    assert (ours - theirs).abs().max() <= 1e-4
    assert mimo_greedy(model, prompt_ids, 32) == hf_greedy(reference, prompt_ids, 32)


def test_fused_fp8_differs_from_split_only_by_quantization(checkpoints, prompt_ids):
    split = mimo_logits(load_language_model(checkpoints["split"], torch.float32, "cpu"), prompt_ids)
    fused = mimo_logits(load_language_model(checkpoints["fused_fp8"], torch.float32, "cpu"), prompt_ids)
    # same seeded weights: e4m3 rounding perturbs the logits (and flips a few routing choices); a misplaced
    # fused row or scale block would leave them nearly uncorrelated
    assert not torch.equal(split, fused)
    assert torch.nn.functional.cosine_similarity(split, fused, dim=-1).mean() > 0.95


def test_fp8_weights_stay_fp8_in_the_layers(checkpoints):
    model = load_language_model(checkpoints["fused_fp8"], torch.float32, "cpu", with_mtp=True)
    layers = {m for m in model.modules() if isinstance(m, ParallelLinear)}
    o_projs = {layer.self_attn.o_proj for layer in [*model.model.layers, *model.model.mtp.layers]}
    # o_proj is stored unquantized (ref §2.1); every other projection keeps the checkpoint's FP8 bytes + scales
    assert {m for m in layers if m.weight.dtype == torch.float8_e4m3fn} == layers - o_projs
    assert all(m.weight_scale_inv.dtype == torch.float32 for m in layers - o_projs)
    with pytest.raises(TypeError, match="holds FP8 weights, which cannot be cast"):
        model.to(torch.bfloat16)
    attention = model.model.layers[0].self_attn.qkv_proj
    floating = load_language_model(checkpoints["fused_fp8"], torch.float32, "cpu", dequantize_fp8=True)
    assert floating.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32
    assert torch.equal(floating.model.layers[0].self_attn.qkv_proj.weight, attention.dense_weight(torch.float32))


def test_attention_runs_one_gemm_for_q_k_v(checkpoints, prompt_ids, monkeypatch):
    model = load_language_model(checkpoints["split"], torch.float32, "cpu")
    attention = model.model.layers[0].self_attn
    assert [name for name, _ in attention.named_parameters()] == ["qkv_proj.weight", "o_proj.weight"]
    weights_used = []
    linear = torch.nn.functional.linear

    def counting_linear(x, weight, *args):
        weights_used.append(weight)
        return linear(x, weight, *args)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    mimo_logits(model, prompt_ids)
    for layer in model.model.layers:
        assert sum(w is layer.self_attn.qkv_proj.weight for w in weights_used) == 1
