"""The roles `builders repository --role` renders, declared once in mimo.serving.contract: their models, what
their models load (counted through HubCheckpoint.accessed), and the repositories rendered from them."""

import dataclasses
import re

import pytest
import torch

from builders.__main__ import main as builders_main
from builders.repository import RepositorySettings, render_repository
from mimo.loading import load_language_model
from mimo.serving import contract
from mimo.serving.contract import ROLES, ContractError, RoleSpec
from mimo.serving.encode import load_multimodal_encoder
from mimo.weights.checkpoint import HubCheckpoint, Role


def test_the_roles_and_their_models():
    assert {name: sorted(role.models) for name, role in ROLES.items()} == {
        "colocated": sorted(contract.MODELS),  # today's repository
        "encoder": ["encode_item", "encode_item_nixl", "media_preprocessing", "mimo_encoder"],
        "language": ["ensemble", "mimo_llm", "postprocessing"],
    }
    assert {name: role.entry for name, role in ROLES.items()} == {
        "colocated": "ensemble", "encoder": "encode_item", "language": "ensemble"}  # fmt: skip
    assert {name: sorted(role.weights) for name, role in ROLES.items()} == {
        "colocated": ["audio", "audio_tokenizer", "language", "vision"],
        "encoder": ["audio", "audio_tokenizer", "vision"],
        "language": ["language"],
    }
    language_entry, colocated_entry = ROLES["language"].models["ensemble"], ROLES["colocated"].models["ensemble"]
    # clients call the language server exactly as the colocated one
    assert (language_entry.inputs, language_entry.outputs) == (colocated_entry.inputs, colocated_entry.outputs)
    assert language_entry.steps == ("mimo_llm",)
    for role in ROLES.values():
        role.check()


def test_a_role_missing_a_model_its_models_call_is_refused():
    encoder = ROLES["encoder"]
    broken = RoleSpec("broken", "", {k: v for k, v in encoder.models.items() if k != "mimo_encoder"}, "encode_item")
    with pytest.raises(ContractError, match="role broken: encode_item calls mimo_encoder, which the role does not"):
        broken.check()
    with pytest.raises(ContractError, match="its entry 'ensemble' is not one of its models"):
        dataclasses.replace(encoder, entry="ensemble").check()
    odd = {**encoder.models, "mimo_encoder": dataclasses.replace(contract.MIMO_ENCODER, weights=("visual",))}
    with pytest.raises(ContractError, match="mimo_encoder loads 'visual', not one of"):
        dataclasses.replace(encoder, models=odd).check()
    wrong = dataclasses.replace(contract.ENCODE_ITEM, outputs=(contract.TensorSpec("pixels", "FP32", (-1,)),))
    with pytest.raises(ContractError, match="ensemble encode_item output 'pixels' is produced by no step"):
        contract.ensemble_steps(wrong, encoder.models)


def read_by_role(tiny_checkpoint) -> dict[str, set[str]]:
    """What each role's models read when they load, as each model.py loads (per checkpoint part)."""
    main, tokenizer = HubCheckpoint(tiny_checkpoint), HubCheckpoint(tiny_checkpoint / "audio_tokenizer")
    load_multimodal_encoder(main, torch.float32, torch.device("cpu"), audio_tokenizer=tokenizer)  # mimo_encoder
    encoder = {"main": set(main.accessed), "audio_tokenizer": set(tokenizer.accessed)}
    main = HubCheckpoint(tiny_checkpoint)
    load_language_model(main, torch.float32, "cpu")  # mimo_llm (its model.py: no MTP)
    return {"encoder": encoder, "language": {"main": set(main.accessed)}, "tokenizer": set(tokenizer.names())}


def test_the_encoder_role_reads_only_encoder_tensors_and_the_language_role_none(tiny_checkpoint):
    reads = read_by_role(tiny_checkpoint)
    ckpt = HubCheckpoint(tiny_checkpoint)
    encoder_tensors = set(ckpt.names(Role.VISION, Role.AUDIO))
    assert encoder_tensors and reads["encoder"]["main"] == encoder_tensors
    assert reads["encoder"]["audio_tokenizer"] == reads["tokenizer"] and reads["tokenizer"]
    assert reads["language"]["main"] == set(ckpt.names(Role.LANGUAGE))
    assert not reads["language"]["main"] & encoder_tensors
    # the declaration says the same: only mimo_encoder (encoder role) and mimo_llm (language role) load tensors
    loaders = {name for role in ROLES.values() for name, spec in role.models.items() if spec.weights}
    assert loaders == {"mimo_encoder", "mimo_llm"}


def parsed(directory):
    return {path.parent.name: path.read_text() for path in directory.glob("*/config.pbtxt")}


def test_rendered_repositories_follow_the_roles(tiny_checkpoint, tmp_path):
    default = tmp_path / "default"
    command = render_repository(RepositorySettings(checkpoint=tiny_checkpoint), default)
    rendered = {}
    for name in ROLES:
        out = tmp_path / name
        servers = {"encoder_urls": "localhost:8101,localhost:8201"} if name == "language" else {}
        assert render_repository(RepositorySettings(checkpoint=tiny_checkpoint, role=name, **servers), out)[1:] == \
            [f"--model-repository={out.resolve()}"]
        rendered[name] = out
        assert sorted(p.name for p in out.iterdir()) == sorted(ROLES[name].models)
    assert command == ["tritonserver", f"--model-repository={default.resolve()}"]
    assert parsed(rendered["colocated"]) == parsed(default)  # the default is today's repository, unchanged
    encoder = rendered["encoder"]
    config = (encoder / "encode_item" / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in config and "backend:" not in config
    assert re.findall(r'model_name: "(\w+)"', config) == ["media_preprocessing", "mimo_encoder"]
    assert '{ key: "prompt_embedding_table" value: "prompt_embedding_table" }' in config
    assert '{ key: "frames" value: "_media_preprocessing_frames" }' in config
    assert list((encoder / "encode_item" / "1").iterdir()) == []  # an ensemble has no model.py
    assert (encoder / "media_preprocessing" / "1" / "model.py").is_file()
    media = (encoder / "media_preprocessing" / "config.pbtxt").read_text()
    assert "dynamic_batching" not in media and 'key: "dtype" value { string_value: "float32" }' in media
    language = parsed(rendered["language"])
    assert language["mimo_llm"] == parsed(default)["mimo_llm"]
    # the colocated entry's config, and the language parameters after it
    entry, colocated_entry = language["ensemble"].split("\nname:")[1], parsed(default)["ensemble"].split("\nname:")[1]
    assert entry.startswith(colocated_entry)
    added = re.findall(r'parameters \{ key: "(\w+)" value \{ string_value: "([^"]*)" \} \}', entry[len(colocated_entry):])
    assert [key for key, _ in added] == list(contract.LANGUAGE_PARAMETERS)
    assert dict(added)["encoder_urls"] == "localhost:8101,localhost:8201"
    with pytest.raises(ValueError, match="--role language needs its encoder servers: --encoder-urls or "):
        RepositorySettings(checkpoint=tiny_checkpoint, role="language")


def test_the_role_flag(tiny_checkpoint, tmp_path, capsys):
    builders_main(["repository", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "r"), "--role",
                   "encoder"])  # fmt: skip
    assert capsys.readouterr().out.strip() == f"tritonserver --model-repository={(tmp_path / 'r').resolve()}"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["encode_item", "encode_item_nixl",
                                                                  "media_preprocessing", "mimo_encoder"]
    with pytest.raises(SystemExit):
        builders_main(["repository", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--role",
                       "decoder"])  # fmt: skip
    with pytest.raises(ValueError, match="role must be one of"):
        RepositorySettings(checkpoint=tiny_checkpoint, role="decoder")


def test_a_local_encoder_adds_the_encoder_models_to_the_language_role(tiny_checkpoint, tmp_path, capsys):
    role = contract.server_role("language", local_encoder=True)
    assert sorted(role.models) == ["encode_item", "ensemble", "media_preprocessing", "mimo_encoder", "mimo_llm",
                                   "postprocessing"]  # fmt: skip
    assert sorted(role.weights) == ["audio", "audio_tokenizer", "language", "vision"]
    assert contract.server_role("language") is ROLES["language"]  # without the flag: no encoder tensor (above)
    role.check()
    out = tmp_path / "language"  # with a local encoder, no encoder server is needed
    builders_main(["repository", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--role", "language",
                   "--local-encoder"])  # fmt: skip
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == sorted(role.models)
    entry = (out / "ensemble" / "config.pbtxt").read_text()
    assert 'key: "local_encoder" value { string_value: "true" }' in entry
    assert 'key: "embedding_cache_bytes" value { string_value: "0" }' in entry  # the cache is off by default
    assert "test_fault_rows" not in (out / "mimo_encoder" / "config.pbtxt").read_text()
    plain = tmp_path / "plain"
    render_repository(RepositorySettings(checkpoint=tiny_checkpoint, role="language", encoder_urls="a:1"), plain)
    assert 'key: "local_encoder" value { string_value: "false" }' in (plain / "ensemble" / "config.pbtxt").read_text()
    for flags, message in (({"role": "encoder", "local_encoder": True}, "--local-encoder is for --role language"),
                           ({"embedding_cache_mb": 1}, "--embedding-cache-mb is for --role language, not colocated"),
                           ({"role": "language", "local_encoder": True, "embedding_cache_mb": -1},
                            "embedding_cache_mb must be >= 0")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            RepositorySettings(checkpoint=tiny_checkpoint, **flags)
    with pytest.raises(ValueError, match="a local encoder is for the language role, not 'encoder'"):
        contract.server_role("encoder", local_encoder=True)
