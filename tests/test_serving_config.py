"""The rendered model repository: every config.pbtxt from the one contract declaration, consistent end to end."""

import argparse
import dataclasses

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from builders.repository import (
    MODEL_FILES,
    MODELS,
    RepositorySettings,
    add_arguments,
    cuda_memory_pool_bytes,
    render_repository,
    settings_from_args,
)
from mimo.engine import EngineConfig, engine_knobs
from mimo.processing.items import PACKED_MEDIA_TENSORS, WIRE_FIELDS, MediaItem
from mimo.serving import contract
from mimo.serving.contract import ENTRY, ContractError, ModelSpec, TensorSpec, entry_steps
from mimo.serving.encode import EncoderConfig, encoder_config, encoder_knobs
from mimo.serving.triton_config import exit_stub_process, instance_device, model_parameter


def parsed(repo, name) -> model_config_pb2.ModelConfig:
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repository(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("rendered") / "repo"
    render_repository(RepositorySettings(checkpoint=tiny_checkpoint), root)
    return {name: parsed(root, name) for name in MODELS}


def test_entry_steps_match_the_rendered_models(repository):
    entry = repository["ensemble"]
    assert entry.backend == "python" and entry.model_transaction_policy.decoupled
    produced = {tensor.name: tensor.data_type for tensor in entry.input}  # source key -> data type
    narrowed = {model_config_pb2.TYPE_INT64: model_config_pb2.TYPE_INT32}  # range-checked client integers
    for step in entry_steps():
        model = repository[step.model]
        inputs = {t.name: t for t in model.input}
        assert set(step.input_map) <= set(inputs), step.model
        assert {name for name, t in inputs.items() if not t.optional} <= set(step.input_map), step.model
        for name, source in step.input_map.items():
            assert inputs[name].data_type in (produced[source], narrowed.get(produced[source])), (step.model, name)
        produced.update({f"{step.model}.{t.name}": t.data_type for t in model.output})
    assert [step.model for step in entry_steps()] == list(ENTRY.steps) == ["preprocessing", "mimo_encoder", "mimo_llm"]
    llm = next(step for step in entry_steps() if step.model == "mimo_llm")
    assert llm.input_map["prompt_embedding_table"] == "mimo_encoder.prompt_embedding_table"
    assert llm.input_map["request_output_len"] == "max_tokens" and llm.input_map["input_ids"] == "preprocessing.input_ids"


def test_the_client_contract_and_tensorrt_llm_names_stay(repository):
    ensemble = repository["ensemble"]
    assert [t.name for t in ensemble.input] == ["text_input", "image_bytes_input", "audio_bytes_input",
                                                "video_bytes_input", "max_tokens", "temperature", "top_k", "top_p",
                                                "random_seed", "stream", "stop_words",
                                                "speculative_decoding"]  # fmt: skip
    assert [t.name for t in ensemble.output] == ["text_output", "output_ids", "finish_reason"]
    llm = repository["mimo_llm"]
    assert [t.name for t in llm.input] == ["input_ids", "input_lengths", "request_output_len", "end_id", "pad_id",
                                           "stop_words_list", "runtime_top_k", "runtime_top_p", "temperature",
                                           "random_seed", "streaming", "prompt_embedding_table", "prompt_vocab_size",
                                           "speculative_decoding", "stop"]  # fmt: skip
    assert [t.name for t in llm.output] == ["output_ids", "sequence_length", "preceding_ids", "finish_reason"]
    assert llm.model_transaction_policy.decoupled


def test_packed_media_come_from_the_media_item_declaration(repository):
    encoder_inputs = [t.name for t in repository["mimo_encoder"].input]
    assert encoder_inputs == list(PACKED_MEDIA_TENSORS)
    assert [t.name for t in repository["preprocessing"].output][-len(encoder_inputs):] == encoder_inputs
    assert len(encoder_inputs) == 18
    # preprocessing-only fields (placeholder text, video metadata) do not travel
    for name in ("video_timestamps", "second_per_grid_ts", "audio_token_len"):
        assert name in {f.name for f in dataclasses.fields(MediaItem)} and name not in WIRE_FIELDS
        assert name not in encoder_inputs and f"{name}_rows" not in encoder_inputs


def test_a_graph_error_names_the_tensor():
    def one_step(*models, inputs=(TensorSpec("x", "INT64", (1,)),)):
        entry = ModelSpec("entry", "", inputs, (), {}, decoupled=True, steps=tuple(m.name for m in models))
        return lambda: entry_steps(entry, {m.name: m for m in models})

    def model(name, inputs, outputs):
        return ModelSpec(name, "", tuple(inputs), tuple(outputs), {})

    x, y = TensorSpec("x", "INT32", (1,)), TensorSpec("y", "INT32", (1,))
    assert one_step(model("m", [x], [y]))()[0].input_map == {"x": "x"}  # INT64 client input narrowed to INT32
    assert one_step(model("m", [x], [y]), model("n", [y], []))()[1].input_map == {"y": "m.y"}
    with pytest.raises(ContractError, match="m input 'z' is required but nothing provides it"):
        one_step(model("m", [TensorSpec("z", "INT32", (1,))], [y]))()
    with pytest.raises(ContractError, match=r"m input 'x' is FP32 \[1\], but its source 'x' is INT64 \[1\]"):
        one_step(model("m", [TensorSpec("x", "FP32", (1,))], [y]))()
    with pytest.raises(ContractError, match=r"n input 'y' is INT64 \[1\], but its source 'y' is INT32 \[1\]"):
        one_step(model("m", [x], [y]), model("n", [TensorSpec("y", "INT64", (1,))], []))()  # only client inputs


def test_engine_knobs_have_one_default_flag_and_parameter(repository, tiny_checkpoint, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tiny_checkpoint), "--out", "x", "--max-num-seqs", "7"])
    settings = settings_from_args(args)
    assert settings.engine == {"max_num_seqs": 7} and settings.max_batch == RepositorySettings.max_batch
    help_text = parser.format_help()
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    parameters = repository["mimo_llm"].parameters
    for name, what in engine_knobs().items():
        assert f"--{name.replace('_', '-')}" in help_text and what.split()[0] in help_text
        assert name in parameters
    assert parameters["max_num_seqs"].string_value == str(defaults["max_num_seqs"])
    assert parameters["max_prefill_chunk"].string_value == ""  # None: the engine's own rule
    assert parameters["cuda_graphs"].string_value == "1"  # decode CUDA graphs on (where the engine can use them)
    # served max_model_len: the default, capped by the checkpoint; preprocessing refuses with the same value
    preprocessing = repository["preprocessing"].parameters
    assert parameters["max_model_len"].string_value == preprocessing["max_model_len"].string_value
    with pytest.raises(ValueError, match=r"engine settings \['max_num_sequences'\] are not EngineConfig knobs"):
        RepositorySettings(checkpoint=tiny_checkpoint, engine={"max_num_sequences": 4})
    with pytest.raises(ValueError, match="EngineConfig.block_size must be a positive int"):
        render_repository(RepositorySettings(checkpoint=tiny_checkpoint, engine={"block_size": 0}), tmp_path / "x")
    # MTP speculative decoding: off by default, at most the checkpoint's 3 MTP layers
    assert parameters["num_speculative_tokens"].string_value == "0"
    with pytest.raises(ValueError, match="num_speculative_tokens=4 needs as many MTP layers; .* has 3"):
        render_repository(RepositorySettings(checkpoint=tiny_checkpoint, engine={"num_speculative_tokens": 4}),
                          tmp_path / "y")


def test_encoder_knobs_have_one_default_flag_and_parameter(repository, tiny_checkpoint, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tiny_checkpoint), "--out", "x", "--max-encoder-batch-patches", "9"])
    settings = settings_from_args(args)
    assert settings.encoder == {"max_encoder_batch_patches": 9} and settings.engine == {}
    help_text = parser.format_help()
    parameters = repository["mimo_encoder"].parameters
    for name, what in encoder_knobs().items():
        assert f"--{name.replace('_', '-')}" in help_text and what.split()[0] in help_text
    served = {name: {"string_value": parameters[name].string_value} for name in encoder_knobs()}
    assert encoder_config({"parameters": served}) == EncoderConfig()  # the field defaults, rendered and read back
    render_repository(settings, tmp_path / "set")
    assert parsed(tmp_path / "set", "mimo_encoder").parameters["max_encoder_batch_patches"].string_value == "9"
    with pytest.raises(ValueError, match=r"encoder settings \['max_batch_patches'\] are not EncoderConfig knobs"):
        RepositorySettings(checkpoint=tiny_checkpoint, encoder={"max_batch_patches": 4})
    with pytest.raises(ValueError, match="EncoderConfig.max_encoder_batch_patches must be a positive int"):
        render_repository(RepositorySettings(checkpoint=tiny_checkpoint, encoder={"max_encoder_batch_patches": 0}),
                          tmp_path / "x")


def test_declared_parameters_are_the_ones_the_models_read():
    for name, spec in contract.MODELS.items():
        text = (MODEL_FILES / name / "1" / "model.py").read_text()
        for parameter in spec.parameters:
            if parameter in {**engine_knobs(), **encoder_knobs()} or parameter == "FORCE_CPU_ONLY_INPUT_TENSORS":
                continue  # read by mimo.serving.llm.engine_config / encode.encoder_config / Triton's Python backend
            assert f'"{parameter}"' in text, (name, parameter)


def test_model_parameter_converts_and_names_problems():
    config = {"name": "m", "parameters": {"n": {"string_value": "12"}, "flag": {"string_value": "no"}}}
    assert model_parameter(config, "n", int) == 12
    assert model_parameter(config, "flag") == "no"
    with pytest.raises(KeyError, match="model 'm' has no parameter 'missing'"):
        model_parameter(config, "missing")
    with pytest.raises(ValueError, match="parameter 'flag' must be int"):
        model_parameter(config, "flag", int)


def test_instance_device_makes_a_gpu_instance_current(monkeypatch):
    made_current = []
    monkeypatch.setattr("torch.cuda.set_device", made_current.append)
    assert instance_device({"model_instance_kind": "CPU", "model_instance_device_id": "0"}).type == "cpu"
    assert made_current == []
    device = instance_device({"model_instance_kind": "GPU", "model_instance_device_id": "1"})
    assert (device.type, device.index) == ("cuda", 1)
    assert made_current == [device]  # DLPack export needs the tensor's device to be current


class _Exited(Exception):
    pass


def test_exit_stub_process_ends_the_stub_unless_disabled(monkeypatch):
    codes = []

    def fake_exit(code):
        codes.append(code)
        raise _Exited

    monkeypatch.setattr("os._exit", fake_exit)
    monkeypatch.delenv("MIMO_STUB_FAST_EXIT", raising=False)
    with pytest.raises(_Exited):
        exit_stub_process()
    assert codes == [0]
    monkeypatch.setenv("MIMO_STUB_FAST_EXIT", "0")
    exit_stub_process()  # returns: the stub's normal teardown runs
    assert codes == [0]


def test_render_writes_every_model(tiny_checkpoint, tmp_path):
    command = render_repository(RepositorySettings(checkpoint=tiny_checkpoint), tmp_path / "repo")
    assert command == ["tritonserver", f"--model-repository={(tmp_path / 'repo').resolve()}"]
    for model in MODELS:
        assert parsed(tmp_path / "repo", model).name == model
        assert (tmp_path / "repo" / model / "1" / "model.py").is_file()
    llm = (tmp_path / "repo" / "mimo_llm" / "config.pbtxt").read_text()
    assert "kind: KIND_CPU" in llm and 'string_value: "yes"' in llm and str(tiny_checkpoint.resolve()) in llm


def test_gpu_render_keeps_tables_on_the_gpu_and_sizes_the_cuda_pool(tiny_checkpoint, tmp_path):
    settings = RepositorySettings(checkpoint=tiny_checkpoint, device="gpu", max_batch=4, encoder_instances=2,
                                  max_media_tokens=1000)  # fmt: skip
    command = render_repository(settings, tmp_path / "repo")
    hidden = 64  # the tiny preset
    assert cuda_memory_pool_bytes(settings, hidden) == 2 * 2 * 4 * 1000 * hidden * 2  # bf16
    assert command[-1] == f"--cuda-memory-pool-byte-size=0:{cuda_memory_pool_bytes(settings, hidden)}"
    for model in ("mimo_encoder", "mimo_llm"):
        text = (tmp_path / "repo" / model / "config.pbtxt").read_text()
        assert "kind: KIND_GPU" in text and "TYPE_BF16" in text
    assert 'key: "FORCE_CPU_ONLY_INPUT_TENSORS" value { string_value: "no" }' in (
        tmp_path / "repo" / "mimo_llm" / "config.pbtxt").read_text()


def test_gpu_render_places_instances_explicitly(tiny_checkpoint, tmp_path):
    # without `gpus`, Triton puts `count` instances on EVERY GPU: two mimo_llm engines on a 2-GPU machine
    settings = RepositorySettings(checkpoint=tiny_checkpoint, device="gpu", encoder_instances=2,
                                  encoder_gpus=(1, 2), llm_gpus=(0,))  # fmt: skip
    command = render_repository(settings, tmp_path / "repo")
    encoder = (tmp_path / "repo" / "mimo_encoder" / "config.pbtxt").read_text()
    llm = (tmp_path / "repo" / "mimo_llm" / "config.pbtxt").read_text()
    assert "instance_group [ { count: 2 kind: KIND_GPU gpus: [ 1, 2 ] } ]" in encoder
    assert "instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]" in llm
    pool = cuda_memory_pool_bytes(settings, 64)
    assert pool == 2 * (2 * 2) * settings.max_batch * settings.max_media_tokens * 64 * 2  # 4 encoder instances
    assert [a for a in command if a.startswith("--cuda-memory-pool")] == [
        f"--cuda-memory-pool-byte-size={gpu}:{pool}" for gpu in (0, 1, 2)]  # fmt: skip


@pytest.mark.parametrize("bad, message", [
    ({"llm_gpus": (0, 1)}, "llm_gpus must name the one GPU"),
    ({"encoder_gpus": ()}, "encoder_gpus must list distinct"),
    ({"encoder_gpus": (1, 1)}, "encoder_gpus must list distinct"),
    ({"encoder_gpus": (-1,)}, "GPU ids must be >= 0"),
    ({"device": "tpu"}, "device must be one of"),
])  # fmt: skip
def test_placement_errors_name_the_setting(tiny_checkpoint, bad, message):
    with pytest.raises(ValueError, match=message):
        RepositorySettings(checkpoint=tiny_checkpoint, **bad)
