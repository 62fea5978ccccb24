"""benchmarks/memory_fit.py counts what the code holds: a tiny FP8 checkpoint converted and loaded per rank has exactly
the parameters and bytes the script computes on meta, and the V2.5 KV arithmetic is the hand formula."""

import json

import pytest
import torch

from benchmarks import memory_fit
from builders.convert import convert
from builders.tiny import build_checkpoint
from mimo.config import MiMoV2Config
from mimo.loading import load_rank_language_model
from mimo.parallel.mapping import Mapping, ParallelRank

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def fused_fp8(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "fused_fp8", fp8=True)


def _held(model: torch.nn.Module) -> tuple[int, int]:
    state = model.state_dict()
    return sum(t.numel() for t in state.values()), sum(t.numel() * t.element_size() for t in state.values())


# tp 8 > the tiny preset's 4 full-attention KV heads: replicated KV heads, as V2.5 on 8 GPUs.
@pytest.mark.parametrize("tp, ep", [(2, 1), (8, 2)])
def test_rank_bytes_are_what_a_loaded_rank_holds(fused_fp8, tmp_path, tp, ep):
    config = MiMoV2Config.from_pretrained(fused_fp8)
    for dtype in ("bf16", "fp8"):
        deploy = convert(fused_fp8, tmp_path / dtype, tp=tp, ep=ep, dtype=dtype, progress=False)
        for rank in range(tp):
            model = load_rank_language_model(deploy, rank, tp, torch.bfloat16, "cpu", with_mtp=True)
            counted = memory_fit.language_rank_bytes(config, ParallelRank(Mapping.create(tp, ep), rank))
            params, held_bytes = _held(model)
            if dtype == "bf16":
                assert (counted["params"], counted["bf16_bytes"]) == (params, held_bytes)
            else:
                scales = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("weight_scale_inv"))
                assert scales > 0
                assert (counted["fp8_bytes"], counted["fp8_scale_bytes"]) == (held_bytes, scales)


def test_encoder_bytes_are_the_built_towers():
    model = memory_fit.v2_5_model(preset="tiny")
    counted = memory_fit.encoder_bytes(model.encoder_configs)
    from mimo.models.vision_tower import MiMoVisionTransformer, VisionConfig

    vision = MiMoVisionTransformer(VisionConfig.from_dict(model.encoder_configs["vision"]))
    assert counted["vision_params"] == sum(p.numel() for p in vision.parameters()) > 0
    assert counted["audio_params"] > 0 and counted["audio_tokenizer_params"] > 0


def test_v2_5_kv_bytes_are_the_hand_formula():
    config = memory_fit.v2_5_model(num_layers=12).config  # layers 0, 5, 11 full; the other 9 sliding
    kv = memory_fit.kv_bytes(config, memory_fit.Budget(gpus=8, num_mtp_layers=3, prefill_chunk=512, block_size=16))
    # 4 full KV heads over 8 GPUs: one (replicated) head per GPU; 8 sliding KV heads: one per GPU.
    # bf16 K (192) + V (128).
    assert kv["full_bytes_per_token"] == 3 * 1 * (192 + 128) * 2
    ring = 128 + 512 + 2  # window + a prefill chunk + the rows an MTP layer recomputes (3 - 1)
    assert kv["sliding_ring_tokens"] == ring
    assert kv["sliding_bytes_per_sequence"] == (9 + 3) * 1 * (192 + 128) * 2 * (-(-ring // 16) * 16)


def test_script_reports_table_and_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    memory_fit.main(["--models", "v2.5", "--layers", "2", "--ep", "8", "--reserve-gib", "12", "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert (report["gpus"], report["reserve_bytes"], report["sequences"]) == (8, 12 * memory_fit.GIB, 64)
    (model,) = report["models"]
    assert [layout["layout"] for layout in model["layouts"]] == ["even/8", "tp8-ep8"]
    deployed = model["layouts"][1]
    fp8, bf16 = deployed["dtypes"]["fp8"], deployed["dtypes"]["bf16"]
    assert fp8["weights_per_gpu_bytes"] < bf16["weights_per_gpu_bytes"]
    encoders = deployed["encoders_on_gpu0_bytes"]
    assert encoders == sum(v for k, v in model["encoders"].items() if k.endswith("_bytes")) > 0
    ranks = deployed["ranks"]
    assert bf16["weights_per_gpu_bytes"] == max(r["bf16_bytes"] + (encoders if i == 0 else 0)
                                                for i, r in enumerate(ranks))  # fmt: skip
    room = memory_fit.GPU_BYTES - 12 * memory_fit.GIB - fp8["weights_per_gpu_bytes"]
    kv = deployed["kv"]
    assert fp8["kv_room_per_gpu_bytes"] == room  # GPU 0, with the encoders, has the least room
    assert fp8["context_tokens"] == (room - 64 * kv["sliding_bytes_per_sequence"]) // kv["full_bytes_per_token"]
    assert fp8["fits"] == (fp8["context_tokens"] >= 64 * 8192)
    assert "| MiMo-V2.5 | tp8-ep8 | fp8 |" in printed


def test_a_budget_that_leaves_no_room_does_not_fit():
    kv = {"full_bytes_per_token": 100, "sliding_bytes_per_sequence": 1000}
    budget = memory_fit.Budget(gpu_bytes=10_000, reserve_bytes=1_000, sequences=4, context_per_sequence=10)
    assert budget.fit(4_000, kv) | {"fits": None} == {
        "weights_per_gpu_bytes": 4_000, "kv_room_per_gpu_bytes": 5_000, "sliding_rings_bytes": 4_000,
        "context_tokens": 10, "fits": None,
    }
    assert not budget.fit(4_000, kv)["fits"]  # 10 tokens < 4 sequences x 10
    assert budget.fit(0, kv)["fits"] and budget.fit(9_500, kv)["context_tokens"] == 0


def test_pro_layers_at_8_gpus_and_reference_counts():
    pro = memory_fit.v2_5_pro_model()
    config = pro.config
    assert (config.num_hidden_layers, config.hidden_size, config.n_routed_experts) == (70, 6144, 384)
    assert config.layer_types.count("full") == 10 and list(config.moe_layers) == [False] + [True] * 69
    assert not config.is_multimodal
    assert set(pro.unverified) >= {"vocab_size", "full-layer indices"}
    Mapping.create(8, 8).check_model(config)


@pytest.mark.parametrize("build", [memory_fit.v2_5_model, memory_fit.v2_5_pro_model])
def test_real_models_have_the_reference_parameter_counts(build):
    model = build()
    counted = memory_fit.language_rank_bytes(model.config, ParallelRank(Mapping.create(1)))
    assert counted["params"] == pytest.approx(memory_fit.REFERENCE_PARAMS[model.name], rel=0.01)
    assert counted["bf16_bytes"] == 2 * counted["params"] + 2 * model.config.n_routed_experts * (
        model.config.num_hidden_layers - 1)  # every tensor bf16 but the float32 router correction biases
