"""config.pbtxt templates, their rendering, and reading parameters back."""

import re

import pytest

from builders.repository import MODELS, TEMPLATES, RepositorySettings, cuda_memory_pool_bytes, render_repository
from mimo.serving.preprocess import PACKED_MEDIA_TENSORS
from mimo.serving.triton_config import (
    exit_stub_process,
    fill_template,
    instance_device,
    model_parameter,
    template_placeholders,
)


def test_fill_template_substitutes_and_is_strict():
    assert fill_template('a: ${x} b: "${y}"', {"x": 1, "y": "two"}) == 'a: 1 b: "two"'
    with pytest.raises(KeyError, match=r"without a value: \['y'\]"):
        fill_template("${x} ${y}", {"x": 1})
    with pytest.raises(KeyError, match=r"without a placeholder: \['z'\]"):
        fill_template("${x}", {"x": 1, "z": 2})
    with pytest.raises(ValueError, match="malformed placeholder"):
        template_placeholders("${x")


def test_model_parameter_converts_and_names_problems():
    config = {"name": "m", "parameters": {"n": {"string_value": "12"}, "flag": {"string_value": "no"}}}
    assert model_parameter(config, "n", int) == 12
    assert model_parameter(config, "flag") == "no"
    with pytest.raises(KeyError, match="model 'm' has no parameter 'missing'"):
        model_parameter(config, "missing")
    with pytest.raises(ValueError, match="parameter 'flag' must be int"):
        model_parameter(config, "flag", int)


def tensor_names(config_text: str, section: str) -> list[str]:
    block = re.search(rf"^{section} \[(.*?)^\]", config_text, re.MULTILINE | re.DOTALL).group(1)
    return re.findall(r'name: "(\w+)"', block)


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


def test_packed_media_tensors_agree_across_preprocessing_encoder_and_ensemble():
    preprocessing = (TEMPLATES / "preprocessing" / "config.pbtxt").read_text()
    encoder = (TEMPLATES / "mimo_encoder" / "config.pbtxt").read_text()
    ensemble = (TEMPLATES / "ensemble" / "config.pbtxt").read_text()
    packed = list(PACKED_MEDIA_TENSORS)
    assert tensor_names(preprocessing, "output")[-len(packed):] == packed
    assert tensor_names(encoder, "input") == packed
    for name in packed:
        assert ensemble.count(f'{{ key: "{name}" value: "_media_{name}" }}') == 2  # produced once, consumed once


def test_render_fills_every_placeholder(tiny_checkpoint, tmp_path):
    command = render_repository(RepositorySettings(checkpoint=tiny_checkpoint), tmp_path / "repo")
    assert command == ["tritonserver", f"--model-repository={(tmp_path / 'repo').resolve()}"]
    for model in MODELS:
        text = (tmp_path / "repo" / model / "config.pbtxt").read_text()
        assert "${" not in text and f'name: "{model}"' in text
        assert (tmp_path / "repo" / model / "1").is_dir()
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
