"""Tensor / expert parallel logits, one process per rank over gloo, against the single-process reference.

The tiny checkpoint is fused FP8, interleaved at TP 4 (4 full-attention KV heads, 8 sliding ones). Each case is
`tools verify`: every rank tensor against the source slice, then logits at the artifact's TP against the
source run in one process, both in float32 (bf16 artifacts: the reference holds the same bf16 weights).
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tools.__main__ import main as tools_main
from builders.convert import convert
from tools.logits import parallel_logits, reference_logits
from builders.tiny import build_checkpoint
from tools.verify import verify
from mimo.loading import load_language_model, load_rank_language_model
from mimo.models.attention import NoCacheAttention
from mimo.parallel.deploy import DeployError
from mimo.parallel.distributed import spawn_ranks


@pytest.fixture(scope="module")
def fused_fp8(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "fused_fp8", fp8=True)


def converted(checkpoint, tmp_path, *, tp, ep=1, dtype="bf16"):
    return convert(checkpoint, tmp_path / f"tp{tp}_ep{ep}_{dtype}", tp=tp, ep=ep, dtype=dtype, progress=False)


def test_tp1_in_process(fused_fp8, tmp_path):
    report = verify(fused_fp8, converted(fused_fp8, tmp_path, tp=1), num_prompts=2)
    assert report.passed and report.weights_exact and report.max_logit_error <= 1e-4


def test_logits_at_another_tp_is_refused(fused_fp8, tmp_path):
    with pytest.raises(DeployError, match=r"converted for world size 2 .* being run with world size 4, tp 4"):
        parallel_logits(converted(fused_fp8, tmp_path, tp=2), [[1, 2]], "cpu", tp=4)


def test_tp2_cli(fused_fp8, tmp_path, capsys):
    deploy = converted(fused_fp8, tmp_path, tp=2)
    tools_main(["verify", "--checkpoint", str(fused_fp8), "--deploy", str(deploy), "--device", "cpu"])
    assert capsys.readouterr().out.startswith("PASS: 2 ranks on cpu\n  weights: max |error| 0 (exact)")


def test_logits_cli_runs_the_artifact_at_its_tp(fused_fp8, tmp_path):
    deploy = converted(fused_fp8, tmp_path, tp=2)
    input_ids = torch.arange(40) * 7 % 500
    np.save(tmp_path / "ids.npy", input_ids.numpy())
    args = ["logits", "--input-ids", str(tmp_path / "ids.npy"), "--out", str(tmp_path / "tp2.npy")]
    tools_main([*args, "--deploy", str(deploy), "--tp", "2"])
    reference_model = load_language_model(fused_fp8, torch.bfloat16, "cpu", dequantize_fp8=True).float()
    reference = reference_logits(reference_model, input_ids)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "tp2.npy")), reference, atol=1e-4, rtol=0)
    with pytest.raises(DeployError, match="converted for world size 2"):
        tools_main([*args, "--deploy", str(deploy), "--tp", "4"])
    with pytest.raises(SystemExit, match="--tp runs a deployment artifact"):
        tools_main([*args, "--checkpoint", str(fused_fp8), "--tp", "2"])


def test_tp2_fp8_expert_parallel_below_the_interleave(fused_fp8, tmp_path):
    """TP 2 < 4: q/k/v blocks are re-quantized, so the weights (not the logits) are held to the e4m3 bound."""
    report = verify(fused_fp8, converted(fused_fp8, tmp_path, tp=2, ep=2, dtype="fp8"), num_prompts=2)
    assert report.passed and not report.weights_exact and not report.logits_checked
    assert 0 < report.max_weight_error <= 0.05


def test_tp4_fp8_at_the_interleave(fused_fp8, tmp_path):
    report = verify(fused_fp8, converted(fused_fp8, tmp_path, tp=4, dtype="fp8"), num_prompts=2)
    assert report.passed and report.weights_exact and report.max_logit_error <= 1e-4


def test_tp8_fp8_replicated_kv_heads_and_expert_parallel(fused_fp8, tmp_path):
    """TP 8 > 4 full-attention KV heads: each is replicated on 2 ranks; experts split over EP 2 x MoE-TP 4."""
    report = verify(fused_fp8, converted(fused_fp8, tmp_path, tp=8, ep=2, dtype="fp8"), num_prompts=2)
    assert report.passed and report.weights_exact and report.max_logit_error <= 1e-4
    assert report.logit_scale > 1.0  # the comparison is not between near-zero logits


def test_golden_logits_catch_a_layout_bug_the_weight_check_shares(fused_fp8, tmp_path, monkeypatch):
    """A wrong `shard_qkv_for_rank` (ranks' q/k/v swapped) fools the converter and the weight check alike, since
    both slice by the layers' rule; the logits of the ranks against the unsharded source do not agree."""
    import mimo.weights.fused_qkv

    shard = mimo.weights.fused_qkv.shard_qkv_for_rank

    def swapped(q, k, v, geometry, tp, rank):
        return shard(q, k, v, geometry, tp, tp - 1 - rank)

    monkeypatch.setattr(mimo.weights.fused_qkv, "shard_qkv_for_rank", swapped)
    report = verify(fused_fp8, converted(fused_fp8, tmp_path, tp=2), num_prompts=1)
    assert report.weights_exact and not report.passed and report.max_logit_error > 1e-2


def test_tp2_mtp_layers(fused_fp8, tmp_path):
    """The MTP rank files: TP 2 draft logits of every MTP layer equal the single-process ones."""
    deploy = converted(fused_fp8, tmp_path, tp=2, ep=2)
    input_ids = torch.arange(30) * 11 % 500
    spawn_ranks(_mtp_logits_worker, 2, "cpu", str(deploy), input_ids, str(tmp_path / "mtp.safetensors"))
    reference = load_language_model(fused_fp8, torch.bfloat16, "cpu", with_mtp=True, dequantize_fp8=True).float()
    expected = _mtp_logits(reference, input_ids)
    got = load_file(tmp_path / "mtp.safetensors")
    assert len(expected) == reference.config.num_nextn_predict_layers == 3
    for k, logits in enumerate(expected):
        torch.testing.assert_close(got[f"mtp.{k}"], logits, atol=1e-4, rtol=0)


def _mtp_logits(model, input_ids):
    """Draft logits of each MTP layer from the target's pre-norm hidden states (next tokens: the inputs shifted)."""
    positions = torch.arange(input_ids.numel())
    attn = NoCacheAttention([input_ids.numel()])
    hidden = model.model(positions, attn, model.embed(input_ids))
    next_ids = input_ids.roll(-1)
    layers = range(model.config.num_nextn_predict_layers)
    return [model.compute_logits(model.forward_mtp(k, positions, attn, next_ids, hidden)) for k in layers]


def _mtp_logits_worker(ctx, deploy, input_ids, out):
    model = load_rank_language_model(deploy, ctx.rank, ctx.world_size, torch.float32, ctx.device, group=ctx.group,
                                     with_mtp=True)  # fmt: skip
    with torch.inference_mode():
        logits = _mtp_logits(model, input_ids)
    if ctx.rank == 0:
        save_file({f"mtp.{k}": t for k, t in enumerate(logits)}, out)
