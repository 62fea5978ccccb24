"""`python -m builders convert`: artifact layout, rank slices against the source, FP8 re-blocking bounds, clear
errors, atomic output and bounded memory. The multi-process logit checks are in test_tensor_parallel.py."""

import json
import shutil
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import builders.convert as convert_module
from builders.__main__ import main as builders_main
from builders.convert import convert
from builders.tiny import build_checkpoint
from tools.verify import check_rank_weights
from mimo.loading import (
    load_audio_encoder,
    load_audio_tokenizer,
    load_rank_language_model,
    load_vision_tower,
)
from mimo.parallel.deploy import DeployArtifact, DeployError
from mimo.parallel.mapping import MappingError
from mimo.weights.checkpoint import INDEX_FILE, CheckpointError, HubCheckpoint, Role
from mimo.weights.fp8 import dequantize_blockwise
from mimo.weights.safetensors_writer import StreamingSafetensorsWriter


@pytest.fixture(scope="module")
def fused_fp8(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "fused_fp8", fp8=True)


@pytest.fixture(scope="module")
def deploy_tp2(fused_fp8, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "tp2"
    builders_main(["convert", "--checkpoint", str(fused_fp8), "--tp", "2", "--out", str(out), "--no-progress"])
    return out


def test_artifact_layout_and_manifest(deploy_tp2, fused_fp8):
    artifact = DeployArtifact.open(deploy_tp2)
    files = set(artifact.manifest["files"])
    assert {"llm/config.json", "llm/rank0.safetensors", "llm/rank1.safetensors", "mtp/rank0.safetensors",
            "mtp/rank1.safetensors", "encoder/model.safetensors", "encoder/config.json", "encoder/tokenizer.json",
            "encoder/audio_tokenizer/model.safetensors", "encoder/audio_tokenizer/config.json"} <= files  # fmt: skip
    assert {path.relative_to(deploy_tp2).as_posix() for path in deploy_tp2.rglob("*") if path.is_file()} == files | {
        "manifest.json"
    }
    artifact.verify_checksums()
    llm_config = json.loads((deploy_tp2 / "llm/config.json").read_text())
    assert llm_config["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1, "moe_tp_size": 2, "moe_ep_size": 1}
    assert llm_config["quantization"]["quant_algo"] is None and "quantization_config" not in llm_config
    with safe_open(deploy_tp2 / "mtp/rank1.safetensors", "pt") as f:
        assert f.keys() and all(name.startswith("model.mtp.layers.") for name in f.keys())
    with safe_open(deploy_tp2 / "llm/rank1.safetensors", "pt") as f:
        assert not any(name.startswith("model.mtp.") for name in f.keys())
        assert f.get_slice("model.layers.0.self_attn.qkv_proj.weight").get_shape() == [176, 64]  # (96 + 48 + 32) rows


def test_encoder_folder_is_a_checkpoint_without_the_language_model(deploy_tp2, fused_fp8):
    encoder = deploy_tp2 / "encoder"
    assert HubCheckpoint(encoder).names(Role.LANGUAGE, Role.MTP) == []
    for load in (load_vision_tower, load_audio_encoder, load_audio_tokenizer):
        converted = load(encoder, torch.float32, "cpu").state_dict()
        source = load(fused_fp8, torch.float32, "cpu").state_dict()
        assert converted.keys() == source.keys() and all(torch.equal(converted[n], source[n]) for n in source)


@pytest.mark.parametrize("tp, ep", [(1, 1), (2, 2), (4, 1), (8, 2)])
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_rank_tensors_are_the_source_slices(fused_fp8, tmp_path, tp, ep, dtype):
    out = convert(fused_fp8, tmp_path / "deploy", tp=tp, ep=ep, dtype=dtype, progress=False)
    artifact = DeployArtifact.open(out)
    errors, failures = check_rank_weights(artifact, fused_fp8)
    assert failures == []
    # bf16 and FP8 at the checkpoint's interleave or above (every new block inside one source block): bit-exact.
    # FP8 below it: q/k/v blocks mix the per-shard grids and are re-quantized once (within the e4m3 bound).
    assert (max(errors) == 0) == (dtype == "bf16" or tp >= 4)


def test_fp8_bounds_catch_a_wrong_slice(fused_fp8, tmp_path):
    out = convert(fused_fp8, tmp_path / "deploy", tp=2, dtype="fp8", progress=False)
    rank_file = out / "llm/rank1.safetensors"
    tensors = load_file(rank_file)
    name = "model.layers.1.self_attn.qkv_proj.weight"
    tensors[name] = tensors[name].roll(24, dims=0)  # a q head's rows in another head's place
    save_file(tensors, rank_file)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["llm/rank1.safetensors"]["bytes"] = rank_file.stat().st_size  # a consistent but wrong artifact
    (out / "manifest.json").write_text(json.dumps(manifest))
    _, failures = check_rank_weights(DeployArtifact.open(out), fused_fp8)
    assert failures == [f"llm/rank1.safetensors:{name}"]


def test_rank_layers_keep_the_rank_files_fp8(fused_fp8, tmp_path):
    deploy = convert(fused_fp8, tmp_path / "deploy", tp=2, ep=2, dtype="fp8", progress=False)
    model = load_rank_language_model(deploy, 1, 2, torch.float32, "cpu", with_mtp=True)
    rank_file = load_file(deploy / "llm/rank1.safetensors")
    qkv = model.model.layers[1].self_attn.qkv_proj
    name = "model.layers.1.self_attn.qkv_proj.weight"
    assert qkv.weight.dtype == torch.float8_e4m3fn and torch.equal(qkv.weight.view(torch.uint8),
                                                                   rank_file[name].view(torch.uint8))  # fmt: skip
    assert torch.equal(qkv.dense_weight(torch.float32),
                       dequantize_blockwise(rank_file[name], rank_file[name + "_scale_inv"], torch.float32))
    experts = model.model.layers[1].mlp.experts
    assert list(experts.expert_ids) == [4, 5, 6, 7]  # EP group 1 of 2
    assert experts.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    gate = dequantize_blockwise(rank_file["model.layers.1.mlp.experts.5.gate_proj.weight"],
                                rank_file["model.layers.1.mlp.experts.5.gate_proj.weight_scale_inv"], torch.float32)
    assert torch.equal(experts.gate_up_proj.dense_weight(torch.float32, 1)[: gate.shape[0]], gate)


def test_split_checkpoint_converts_like_the_fused_one(tmp_path):
    # Same seed, same weights; unquantized so that both layouts hold them exactly.
    fused, split = (build_checkpoint(tmp_path / layout, layout=layout) for layout in ("fused", "split"))
    from_split, from_fused = (convert(c, tmp_path / f"{c.name}_tp4", tp=4, progress=False) for c in (split, fused))
    for rank in range(4):
        assert_same_tensors(from_split / f"llm/rank{rank}.safetensors", from_fused / f"llm/rank{rank}.safetensors")
    split_fp8 = build_checkpoint(tmp_path / "split_fp8", fp8=True, layout="split")
    _, failures = check_rank_weights(
        DeployArtifact.open(convert(split_fp8, tmp_path / "fp8", tp=8, dtype="fp8", progress=False)),
        split_fp8,
    )
    assert failures == []


def assert_same_tensors(file_a, file_b):
    a, b = load_file(file_a), load_file(file_b)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_tp_that_does_not_divide_the_heads(fused_fp8, tmp_path):
    with pytest.raises(MappingError, match="tp_size 3 does not divide num_attention_heads=8"):
        convert(fused_fp8, tmp_path / "d", tp=3, progress=False)
    with pytest.raises(MappingError, match="tp_size 16 does not divide num_attention_heads=8"):
        convert(fused_fp8, tmp_path / "d", tp=16, progress=False)
    with pytest.raises(MappingError, match="expert parallel size 4 must be >= 1 and divide tp size 2"):
        convert(fused_fp8, tmp_path / "d", tp=2, ep=4, progress=False)
    assert not (tmp_path / "d").exists()


def _copy(checkpoint, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    return copy


def test_fused_rows_that_do_not_match_the_config(fused_fp8, tmp_path):
    copy = _copy(fused_fp8, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config["num_attention_heads"] = 4  # full layers now expect 4 shards of (24, 24, 16) rows
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.qkv_proj.weight has shape \(352, 64\), "
                       r"expected \(256, 64\): 4 interleaved shards"):  # fmt: skip
        convert(copy, tmp_path / "d", tp=2, progress=False)


def test_scale_grid_that_is_not_per_shard(fused_fp8, tmp_path):
    copy = _copy(fused_fp8, tmp_path)
    name = "model.layers.0.self_attn.qkv_proj.weight_scale_inv"
    shard = copy / json.loads((copy / INDEX_FILE).read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:3]  # the contiguous grid of 352 rows, not 4 per-shard grids
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name} has shape \(3, 1\), expected \(4, 1\): one 128x128 grid"):
        convert(copy, tmp_path / "d", tp=2, progress=False)


def test_truncated_source_shard(fused_fp8, tmp_path):
    copy = _copy(fused_fp8, tmp_path)
    shard = copy / json.loads((copy / INDEX_FILE).read_text())["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"shard {shard.name} is not a readable safetensors file"):
        convert(copy, tmp_path / "d", tp=2, progress=False)
    assert not (tmp_path / "d").exists()


def test_inconsistent_mapping_in_the_artifact(deploy_tp2, tmp_path):
    copy = _copy(deploy_tp2, tmp_path)
    config = json.loads((copy / "llm/config.json").read_text())
    config["mapping"]["moe_ep_size"] = 2  # moe_tp_size stays 2: 2 x 2 != tp_size 2
    (copy / "llm/config.json").write_text(json.dumps(config))
    with pytest.raises(MappingError, match="inconsistent mapping"):
        DeployArtifact.open(copy)


def test_fp8_output_needs_an_fp8_checkpoint(tmp_path):
    bf16 = build_checkpoint(tmp_path / "bf16")
    with pytest.raises(ValueError, match="--dtype fp8 needs an FP8 checkpoint"):
        convert(bf16, tmp_path / "d", tp=2, dtype="fp8", progress=False)


def test_artifact_used_with_another_world_size(deploy_tp2):
    with pytest.raises(DeployError, match="converted for world size 2 .* being run with world size 4"):
        load_rank_language_model(deploy_tp2, 0, 4, torch.float32, "cpu")


def test_truncated_and_altered_rank_files(deploy_tp2, tmp_path):
    copy = _copy(deploy_tp2, tmp_path)
    rank_file = copy / "llm/rank1.safetensors"
    data = rank_file.read_bytes()
    rank_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(DeployError, match=r"llm/rank1.safetensors is \d+ bytes, the manifest says \d+ bytes"):
        load_rank_language_model(copy, 1, 2, torch.float32, "cpu")
    rank_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DeployError, match=r"sha256 mismatch for \['llm/rank1.safetensors'\]"):
        DeployArtifact.open(copy).verify_checksums()


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_failed_conversion_leaves_no_artifact(fused_fp8, deploy_tp2, tmp_path, monkeypatch, failure):
    previous = _copy(deploy_tp2, tmp_path)
    manifest = (previous / "manifest.json").read_text()
    calls = []

    def failing_take(*args):
        calls.append(1)
        if len(calls) == 50:
            raise failure("interrupted")
        return take(*args)

    take = convert_module._take
    monkeypatch.setattr(convert_module, "_take", failing_take)
    with pytest.raises(failure):
        convert(fused_fp8, previous, tp=4, progress=False)
    with pytest.raises(failure):
        calls.clear()
        convert(fused_fp8, tmp_path / "new", tp=4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no new artifact, no temp directory
    assert (previous / "manifest.json").read_text() == manifest
    DeployArtifact.open(previous).verify_checksums()


def test_at_most_one_source_tensor_group_in_memory(fused_fp8, tmp_path, monkeypatch):
    """Every tensor read from the source is freed before the next group is read (a weight and its scale grid), and
    shards are read one after the other, each unmapped after its last tensor."""
    live, peak = [0], [0]
    shards_in_use, most_in_use = set(), [0]  # shards data was read from and that are not released yet
    read, release = HubCheckpoint.tensor, HubCheckpoint.release

    def counting_read(self, name):
        tensor = read(self, name)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(tensor, lambda: live.__setitem__(0, live[0] - 1))
        shards_in_use.add(self.shard_of(name))
        most_in_use[0] = max(most_in_use[0], len(shards_in_use))
        return tensor

    def counting_release(self, shard):
        shards_in_use.discard(shard)
        release(self, shard)

    monkeypatch.setattr(HubCheckpoint, "tensor", counting_read)
    monkeypatch.setattr(HubCheckpoint, "release", counting_release)
    convert(fused_fp8, tmp_path / "d", tp=4, dtype="fp8", progress=False)
    assert peak[0] == 2 and live[0] == 0
    assert len({HubCheckpoint(fused_fp8).shard_of(n) for n in HubCheckpoint(fused_fp8).names()}) > 4  # several, ...
    assert most_in_use[0] <= 2 and not shards_in_use  # ... one at a time (a weight and its scale may straddle two)


def test_streaming_writer_checks_the_plan(tmp_path):
    planned = [("a", torch.bfloat16, (2, 3)), ("b", torch.float8_e4m3fn, (4,))]
    with StreamingSafetensorsWriter(tmp_path / "x.safetensors", planned) as writer:
        a = torch.randn(2, 3).to(torch.bfloat16)
        writer.write("a", a)
        with pytest.raises(ValueError, match=r"got 'c' torch.float32 \(4,\), planned next 'b' torch.float8_e4m3fn"):
            writer.write("c", torch.zeros(4))
        with pytest.raises(ValueError, match="1 planned tensors were never written"):
            writer.finish()
    with StreamingSafetensorsWriter(tmp_path / "y.safetensors", planned) as writer:
        b = torch.randn(4).to(torch.float8_e4m3fn)
        writer.write("a", a)
        writer.write("b", b)
        writer.finish()
    loaded = load_file(tmp_path / "y.safetensors")
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"].view(torch.uint8), b.view(torch.uint8))
