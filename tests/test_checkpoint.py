"""Strict hub-checkpoint reading: the checkpoint files (hand-made tensors, no model code) and the language model's
layers loading tiny checkpoints of every layout, with one inconsistency each."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from builders.tiny import build_checkpoint
from mimo.loading import hub_state_dict, load_language_model
from mimo.weights.checkpoint import INDEX_FILE, CheckpointError, HubCheckpoint, Role, read_state_dict, tensor_role
from mimo.weights.fp8 import quantize_blockwise
from mimo.weights.fused_qkv import QKVGeometry, fuse_interleaved, quantize_interleaved
from mimo.weights.safetensors_writer import write_sharded

HIDDEN = 64
FULL = QKVGeometry(num_heads=8, num_kv_heads=4, head_dim=24, v_head_dim=16)  # 88 rows per shard
SLIDING = QKVGeometry(num_heads=8, num_kv_heads=8, head_dim=24, v_head_dim=16)  # 128 rows per shard
CKPT_TP = 4


def geometry_of(name: str) -> QKVGeometry:
    return FULL if name.startswith("model.layers.0.") else SLIDING


def canonical_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {
        "model.embed_tokens.weight": torch.randn(32, HIDDEN, generator=g),
        "lm_head.weight": torch.randn(32, HIDDEN, generator=g),
    }
    for prefix, geometry in (("model.layers.0.", FULL), ("model.layers.1.", SLIDING), ("model.mtp.layers.0.", SLIDING)):
        for proj, rows in zip("qkv", geometry.canonical_rows()):
            state[f"{prefix}self_attn.{proj}_proj.weight"] = torch.randn(rows, HIDDEN, generator=g) * 0.02
        state[f"{prefix}mlp.gate_proj.weight"] = torch.randn(200, HIDDEN, generator=g) * 0.02
    return state


def hub_tensors(fp8: bool, fused: bool = True) -> dict[str, torch.Tensor]:
    """The hub form of `canonical_state` plus one vision and one audio tensor."""
    state = canonical_state()
    hub = {
        "visual.patch_embed.proj.weight": torch.randn(8, 12),
        "audio_encoder.speech_embeddings.0.weight": torch.randn(8, 4),
    }
    for name, tensor in state.items():
        if fused and name.endswith("self_attn.q_proj.weight"):
            prefix = name.removesuffix("q_proj.weight")
            geometry = geometry_of(name)
            qkv = fuse_interleaved(
                tensor, state[prefix + "k_proj.weight"], state[prefix + "v_proj.weight"], geometry, CKPT_TP
            )
            if fp8:
                hub[prefix + "qkv_proj.weight"], hub[prefix + "qkv_proj.weight_scale_inv"] = quantize_interleaved(
                    qkv, geometry, CKPT_TP
                )
            else:
                hub[prefix + "qkv_proj.weight"] = qkv
        elif fused and name.endswith(("k_proj.weight", "v_proj.weight")):
            continue
        elif fp8 and (name.endswith("proj.weight")):
            hub[name], hub[name + "_scale_inv"] = quantize_blockwise(tensor)
        else:
            hub[name] = tensor
    return hub


def write(tmp_path, hub, max_shard_bytes=20_000):
    out = tmp_path / "ckpt"
    write_sharded(out, hub, max_shard_bytes)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny hub checkpoints (geometries of FULL / SLIDING above) whose tensors the tests below edit."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        (layout, fp8): build_checkpoint(root / f"{layout}_{fp8}", layout=layout, fp8=fp8)
        for layout in ("fused", "split")
        for fp8 in (False, True)
    }


def edited(tmp_path, source, edit=lambda hub: None, *, layout_of=None):
    """A copy of checkpoint `source` with its tensors edited in place by `edit(hub)` (config from `layout_of`)."""
    hub = {name: HubCheckpoint(source).tensor(name) for name in HubCheckpoint(source).names()}
    edit(hub)
    out = tmp_path / "edited"
    write_sharded(out, hub, 20_000)
    shutil.copyfile((layout_of or source) / "config.json", out / "config.json")
    return out


def load(checkpoint, **kwargs):
    return load_language_model(checkpoint, torch.float32, "cpu", with_mtp=True, **kwargs)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_fused_and_split_checkpoints_load_the_same_layers(tiny, fp8):
    fused, split = HubCheckpoint(tiny["fused", fp8]), HubCheckpoint(tiny["split", fp8])
    from_fused, from_split = load(fused), load(split)
    assert not any(n.startswith(("visual.", "audio_")) for n in fused.accessed | split.accessed)  # roles split
    exact = load(tiny["split", False])
    a_state, b_state, exact_state = hub_state_dict(from_fused), hub_state_dict(from_split), hub_state_dict(exact)
    assert a_state.keys() == b_state.keys() == exact_state.keys()
    for name, reference in exact_state.items():
        a, b = a_state[name], b_state[name]
        # both layouts hold the same weights; FP8 ones within one e4m3 rounding of the unquantized checkpoint
        tolerance = reference.abs().max() * 2.0**-4 if fp8 and a.dim() == 2 and "proj" in name else 0.0
        assert (a - reference).abs().max() <= tolerance and (b - reference).abs().max() <= tolerance, name
    if fp8:  # the fused FP8 layout keeps the hub bytes, only the per-shard grids differ from the split one
        assert torch.equal(from_fused.state_dict()["model.layers.1.mlp.experts.gate_up_proj.weight"].view(torch.uint8),
                           from_split.state_dict()["model.layers.1.mlp.experts.gate_up_proj.weight"].view(torch.uint8))


def test_split_checkpoint_and_dtype_follow_the_module(tiny):
    model = load_language_model(tiny["split", False], torch.bfloat16, "cpu")
    assert all(t.dtype == torch.bfloat16 for n, t in model.state_dict().items() if "e_score" not in n)


def test_encoder_role_reads_no_language_tensor(tmp_path):
    ckpt = HubCheckpoint(write(tmp_path, hub_tensors(fp8=True)))
    state = read_state_dict(
        ckpt,
        ckpt.names(Role.VISION),
        {"patch_embed.proj.weight": torch.empty(8, 12, device="meta")},
        device="cpu",
        to_module_name=lambda n: n.removeprefix("visual."),
    )
    assert list(state) == ["patch_embed.proj.weight"]
    assert ckpt.accessed == {"visual.patch_embed.proj.weight"}


def test_tensor_roles():
    assert tensor_role("model.layers.0.mlp.gate.weight") is Role.LANGUAGE
    assert tensor_role("lm_head.weight") is Role.LANGUAGE
    assert tensor_role("model.mtp.layers.2.eh_proj.weight") is Role.MTP
    assert tensor_role("visual.blocks.0.attn.qkv.weight") is Role.VISION
    assert tensor_role("vision_model.merger.ln_q.weight") is Role.VISION
    assert tensor_role("audio_encoder.projection.mlp.0.weight") is Role.AUDIO
    assert tensor_role("speech_embeddings.3.weight") is Role.AUDIO
    with pytest.raises(CheckpointError, match="tensor 'encoder.conv1.weight' belongs to no role"):
        tensor_role("encoder.conv1.weight")


def test_missing_tensor(tiny, tmp_path):
    def drop(hub):
        del hub["model.layers.1.mlp.experts.3.up_proj.weight"]

    with pytest.raises(
        CheckpointError,
        match=re.escape("missing tensors ['model.layers.1.mlp.experts.3.up_proj.weight'], unexpected tensors []"),
    ):
        load(edited(tmp_path, tiny["fused", False], drop))


def test_unexpected_tensor(tiny, tmp_path):
    def add(hub):
        hub["model.layers.1.mlp.bias"] = torch.zeros(3)

    with pytest.raises(
        CheckpointError, match=re.escape("missing tensors [], unexpected tensors ['model.layers.1.mlp.bias']")
    ):
        load(edited(tmp_path, tiny["fused", False], add))


def test_tolerated_extras_are_skipped(tiny, tmp_path):
    def add(hub):
        hub["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)

    load(edited(tmp_path, tiny["fused", False], add))


def test_misshaped_tensor(tiny, tmp_path):
    def shrink(hub):
        hub["model.embed_tokens.weight"] = hub["model.embed_tokens.weight"][:-1]

    with pytest.raises(CheckpointError, match=r"'model.embed_tokens.weight' has shape \(\d+, 64\) .* expects"):
        load(edited(tmp_path, tiny["fused", False], shrink))


def test_fused_rows_of_wrong_geometry(tiny, tmp_path):
    def full_rows_in_a_sliding_layer(hub):
        hub["model.layers.1.self_attn.qkv_proj.weight"] = hub["model.layers.0.self_attn.qkv_proj.weight"]

    with pytest.raises(
        CheckpointError,
        match=r"model.layers.1.self_attn.qkv_proj.weight has shape \(352, 64\), expected \(512, 64\): 4 interleaved",
    ):
        load(edited(tmp_path, tiny["fused", False], full_rows_in_a_sliding_layer))


def test_contiguous_scale_grid_on_fused_qkv(tiny, tmp_path):
    name = "model.layers.0.self_attn.qkv_proj.weight"

    def contiguous_grid(hub):
        _, hub[name + "_scale_inv"] = quantize_blockwise(hub[name].float())  # 3 rows over 352; per shard: 4 x 1

    with pytest.raises(
        CheckpointError,
        match=r"qkv_proj.weight_scale_inv has shape \(3, 1\), expected \(4, 1\): one 128x128 grid per each of the 4",
    ):
        load(edited(tmp_path, tiny["fused", True], contiguous_grid))


def test_wrong_plain_scale_grid(tiny, tmp_path):
    def wrong_grid(hub):
        hub["model.layers.0.mlp.gate_proj.weight_scale_inv"] = torch.ones(2, 1)

    with pytest.raises(CheckpointError, match=r"gate_proj.weight_scale_inv has shape \(2, 1\), expected \(1, 1\)"):
        load(edited(tmp_path, tiny["fused", True], wrong_grid))


def test_fp8_weight_without_scale(tiny, tmp_path):
    def drop_scale(hub):
        del hub["model.layers.0.mlp.gate_proj.weight_scale_inv"]

    with pytest.raises(
        CheckpointError,
        match="FP8 tensor 'model.layers.0.mlp.gate_proj.weight' has no 'model.layers.0.mlp.gate_proj.weight_scale_inv'",
    ):
        load(edited(tmp_path, tiny["fused", True], drop_scale))


def test_scale_without_fp8_weight(tiny, tmp_path):
    def add_scale(hub):
        hub["lm_head.weight_scale_inv"] = torch.ones(1, 1)

    with pytest.raises(CheckpointError, match="lm_head.weight_scale_inv belongs to 'lm_head.weight', which is not FP8"):
        load(edited(tmp_path, tiny["fused", False], add_scale))


def test_layout_must_match_config(tiny, tmp_path):
    fused, split = tiny["fused", False], tiny["split", False]
    with pytest.raises(
        CheckpointError, match="'model.layers.0.self_attn.qkv_proj.weight' is a fused qkv_proj, but the config has no"
    ):
        load(edited(tmp_path / "a", fused, layout_of=split))
    with pytest.raises(
        CheckpointError, match="'model.layers.0.self_attn.q_proj.weight' is a split projection, but the config declares"
    ):
        load(edited(tmp_path / "b", split, layout_of=fused))


def test_index_points_to_missing_shard(tmp_path):
    out = write(tmp_path, hub_tensors(fp8=False))
    index = json.loads((out / INDEX_FILE).read_text())
    index["weight_map"]["lm_head.weight"] = "model-00099-of-00099.safetensors"
    (out / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match="maps 'lm_head.weight' to shard model-00099-of-00099.safetensors, which does not exist"
    ):
        HubCheckpoint(out)


def test_truncated_shard(tmp_path):
    out = write(tmp_path, hub_tensors(fp8=False))
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(
        CheckpointError, match=f"shard {shard.name} is not a readable safetensors file: .*incomplete metadata"
    ):
        HubCheckpoint(out)


def test_index_and_shard_disagree(tmp_path):
    out = write(tmp_path, hub_tensors(fp8=False))
    shard = sorted(out.glob("model-*.safetensors"))[0]
    save_file({"model.stray.weight": torch.zeros(2)}, shard)
    with pytest.raises(
        CheckpointError,
        match=rf"shard {shard.name} does not match {INDEX_FILE}: listed but not stored \[.+\], "
        r"stored but not listed \['model.stray.weight'\]",
    ):
        HubCheckpoint(out)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="has neither model.safetensors.index.json nor model.safetensors"):
        HubCheckpoint(tmp_path)


def test_write_sharded_layout_and_atomic_replace(tmp_path):
    hub = hub_tensors(fp8=True)
    out = tmp_path / "ckpt"
    index = write_sharded(out, hub, max_shard_bytes=20_000, metadata={"producer": "test"})
    files = {p.name for p in out.iterdir()}
    n = len(files) - 1
    assert n > 2 and files == {INDEX_FILE} | {f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}
    assert index == json.loads((out / INDEX_FILE).read_text())
    assert index["metadata"] == {
        "total_size": sum(t.numel() * t.element_size() for t in hub.values()),
        "producer": "test",
    }
    assert set(index["weight_map"]) == set(hub)
    ckpt = HubCheckpoint(out)
    assert torch.equal(ckpt.tensor("lm_head.weight"), hub["lm_head.weight"])

    write_sharded(out, {"lm_head.weight": torch.zeros(2, 2)}, max_shard_bytes=20_000)  # replaces the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp directories left behind
    assert HubCheckpoint(out).names() == ["lm_head.weight"]

    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a checkpoint directory"):
        write_sharded(unrelated, hub, max_shard_bytes=20_000)
    assert (unrelated / "todo.txt").read_text() == "keep me"


def test_write_sharded_streams_and_rejects_duplicates(tmp_path):
    def stream():
        for i in range(5):
            yield f"model.layers.{i}.input_layernorm.weight", torch.full((3000,), float(i))  # 12 kB each

    index = write_sharded(tmp_path / "streamed", stream(), max_shard_bytes=25_000)
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert HubCheckpoint(tmp_path / "streamed").tensor("model.layers.4.input_layernorm.weight")[0] == 4.0
    with pytest.raises(ValueError, match="tensor 'lm_head.weight' is given twice"):
        write_sharded(tmp_path / "dup", [("lm_head.weight", torch.ones(2)), ("lm_head.weight", torch.ones(2))], 100)
    assert not (tmp_path / "dup").exists()
