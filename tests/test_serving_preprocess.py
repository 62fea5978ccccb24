"""preprocessing and mimo_encoder cores: request tensors -> prompt-table ids + packed media -> per-request tables."""

import base64
import dataclasses

import numpy as np
import pytest
import torch

from client.sample_media import sample_image, sample_tone
from processing_media import encode_video
from mimo.processing.errors import ProcessingError
from mimo.processing.items import PACKED_MEDIA_TENSORS
from mimo.processing.processor import MiMoProcessor
from mimo.serving.contract import PREPROCESSING, triton_type
from mimo.serving.encode import (
    EncoderConfig, PromptTableEncoder, budget_chunks, encoder_config, load_multimodal_encoder, unpack_request,
)
from mimo.serving.preprocess import decode_media_item, preprocess_request, user_messages

MAX_MODEL_LEN = 4096


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return MiMoProcessor.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint, processor):
    return PromptTableEncoder(load_multimodal_encoder(tiny_checkpoint, torch.float32, torch.device("cpu")),
                              processor.config)  # fmt: skip


def request(text: bytes, **media) -> dict[str, np.ndarray]:
    inputs = {"text_input": np.array([[text]], dtype=np.object_)}
    inputs.update({name: np.array([items], dtype=np.object_) for name, items in media.items()})
    return inputs


def test_data_urls_carry_media_through_json_transports():
    png = sample_image()
    assert decode_media_item(b"data:image/png;base64," + base64.b64encode(png), "image_bytes_input", 0) == png
    assert decode_media_item(png, "image_bytes_input", 0) == png
    with pytest.raises(ProcessingError, match=r"image_bytes_input\[1\] has an invalid base64 payload"):
        decode_media_item(b"data:image/png;base64,@@@", "image_bytes_input", 1)
    with pytest.raises(ProcessingError, match="not 'data:<mime>;base64,<payload>'"):
        decode_media_item(b"data:text/plain,hello", "image_bytes_input", 0)
    with pytest.raises(ProcessingError, match=r"audio_bytes_input\[0\] is empty"):
        decode_media_item(b"", "audio_bytes_input", 0)


def test_user_turn_puts_media_before_the_text():
    messages = user_messages(b"Hi", {"audio_bytes_input": [b"wav"], "image_bytes_input": [b"png"]})
    assert [part["type"] for part in messages[0]["content"]] == ["image", "audio", "text"]
    with pytest.raises(ProcessingError, match="not valid UTF-8"):
        user_messages(b"\xff\xfe", {})
    with pytest.raises(ProcessingError, match="text_input is empty"):
        user_messages(b" \n", {})


def test_outputs_are_the_declared_ones_and_map_placeholders_to_prompt_table_rows(processor):
    outputs = preprocess_request(processor, request(b"Look and listen", image_bytes_input=[sample_image()],
                                                    audio_bytes_input=[sample_tone()]), MAX_MODEL_LEN)  # fmt: skip
    assert list(outputs) == [tensor.name for tensor in PREPROCESSING.outputs]
    for tensor in PREPROCESSING.outputs:
        array = outputs[tensor.name]
        assert triton_type(array.dtype) == tensor.dtype and array.shape[0] == 1, tensor.name
        assert array.ndim == len(tensor.dims) + 1 and all(d in (-1, n) for d, n in zip(tensor.dims, array.shape[1:]))
    ids = outputs["input_ids"][0]
    rows = int(outputs["num_tokens"].sum())
    table_ids = ids[ids >= processor.vocab_size] - processor.vocab_size
    assert sorted(table_ids.tolist()) == list(range(rows))
    assert outputs["input_lengths"][0, 0] == ids.size
    assert outputs["end_id"][0, 0] == processor.tokenizer.eos_token_id
    assert outputs["stop_words_list"].tolist() == [[[0], [-1]]]


def test_stop_words_use_the_tensorrt_llm_layout(processor):
    inputs = {**request(b"Hi"), "stop_words": np.array([[b"the end", b"!"]], np.object_)}
    outputs = preprocess_request(processor, inputs, MAX_MODEL_LEN)
    the_end, bang = processor.encode_text("the end"), processor.encode_text("!")
    stops = outputs["stop_words_list"][0]
    assert stops[0, : len(the_end) + len(bang)].tolist() == the_end + bang
    assert stops[1, :2].tolist() == [len(the_end), len(the_end) + len(bang)]


def test_exactly_one_text_input(processor):
    with pytest.raises(ProcessingError, match="exactly one string, got 2"):
        preprocess_request(processor, {"text_input": np.array([[b"a", b"b"]], dtype=np.object_)}, MAX_MODEL_LEN)


def test_a_prompt_with_its_media_tokens_must_leave_room_for_max_tokens(processor):
    image = request(b"Look", image_bytes_input=[sample_image()])
    length = preprocess_request(processor, image, MAX_MODEL_LEN)["input_lengths"][0, 0]
    text_length = preprocess_request(processor, request(b"Look"), MAX_MODEL_LEN)["input_lengths"][0, 0]
    assert length > text_length  # the image's tokens count
    fits = {**image, "max_tokens": np.array([[MAX_MODEL_LEN - length]], dtype=np.int32)}
    assert preprocess_request(processor, fits, MAX_MODEL_LEN)["input_lengths"][0, 0] == length
    too_long = {**image, "max_tokens": np.array([[MAX_MODEL_LEN - length + 1]], dtype=np.int32)}
    with pytest.raises(ProcessingError, match=f"prompt length {length} \\+ max_tokens {MAX_MODEL_LEN - length + 1} = "
                                              f"{MAX_MODEL_LEN + 1} exceeds max_model_len {MAX_MODEL_LEN}"):
        preprocess_request(processor, too_long, MAX_MODEL_LEN)
    with pytest.raises(ProcessingError, match="max_tokens must hold exactly one value, got 2"):
        preprocess_request(processor, {**image, "max_tokens": np.array([[1, 2]], dtype=np.int32)}, MAX_MODEL_LEN)


def test_batched_encoding_equals_one_by_one_and_isolates_a_bad_request(processor, encoder):
    def items(**media):
        outputs = preprocess_request(processor, request(b"Hi", **media), MAX_MODEL_LEN)
        return unpack_request({name: outputs[name] for name in PACKED_MEDIA_TENSORS})

    first = items(image_bytes_input=[sample_image()], audio_bytes_input=[sample_tone()])
    second = items(image_bytes_input=[sample_image((0, 90, 0), (64, 128))])
    text_only = items()
    together = encoder.encode([first, second, text_only])
    alone = [encoder.encode([r])[0] for r in (first, second, text_only)]
    for batched, single, request_items in zip(together, alone, (first, second, text_only)):
        assert batched.shape == (sum(i.num_tokens for i in request_items), 64)
        torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    assert together[2].shape[0] == 0

    wrong_rows = [dataclasses.replace(first[0], num_tokens=first[0].num_tokens + 1), first[1]]
    results = encoder.encode([second, wrong_rows])
    torch.testing.assert_close(results[0], alone[1], rtol=1e-4, atol=1e-5)
    assert isinstance(results[1], ProcessingError) and "encoder produced" in str(results[1])


def test_budget_chunks_are_consecutive_runs_within_the_budget():
    assert budget_chunks([3, 4, 2, 5, 1], 7) == [range(0, 2), range(2, 4), range(4, 5)]
    assert budget_chunks([3, 9, 2], 7) == [range(0, 1), range(1, 2), range(2, 3)]  # 9 alone
    assert budget_chunks([2, 2, 2], 100) == [range(0, 3)]
    assert budget_chunks([5, 5], 1) == [range(0, 1), range(1, 2)]
    assert budget_chunks([], 8) == []


def test_vision_forwards_stay_within_the_patch_budget_and_tables_do_not_change(processor, encoder):
    def items(**media):
        outputs = preprocess_request(processor, request(b"Hi", **media), MAX_MODEL_LEN)
        return unpack_request({name: outputs[name] for name in PACKED_MEDIA_TENSORS})

    small, large = sample_image((0, 90, 0), (64, 32)), sample_image((200, 40, 40), (128, 96))
    requests = [items(image_bytes_input=[small, large], audio_bytes_input=[sample_tone()]),
                items(video_bytes_input=[encode_video(2.0, 4)], image_bytes_input=[large, small, small]),
                items(), items(image_bytes_input=[small], video_bytes_input=[encode_video(1.0, 4, width=64)])]
    patches = [[int(item.grid_thw.prod()) for item in r if item.grid_thw is not None] for r in requests]
    budget = 2 * max(max(p) for p in patches if p) - 1  # at least one forward holds two items, none all of them

    def encode(budget_patches):
        recording = RecordingEncoder(encoder.encoder)
        tables = PromptTableEncoder(recording, processor.config,
                                    EncoderConfig(max_encoder_batch_patches=budget_patches)).encode(requests)
        return tables, recording.forwards

    huge, huge_forwards = encode(10**9)
    assert [(name, len(sizes)) for name, sizes in huge_forwards] == [("encode_images", 6), ("encode_videos", 2)]
    for budget_patches in (1, budget):
        split, forwards = encode(budget_patches)
        assert len(forwards) > len(huge_forwards)
        assert all(sum(sizes) <= budget_patches or len(sizes) == 1 for _, sizes in forwards)
        assert [s for _, sizes in forwards for s in sizes] == [s for _, sizes in huge_forwards for s in sizes]
        for together, apart in zip(huge, split, strict=True):
            # equal up to float32 rounding (measured: 4 ulp): a CPU GEMM's rows depend on how many rows it multiplies
            torch.testing.assert_close(apart, together, rtol=1e-5, atol=1e-6)
    assert any(len(sizes) > 1 for _, sizes in encode(budget)[1])


class RecordingEncoder:
    """A multimodal encoder that records the patch count of each item of every vision forward."""

    def __init__(self, encoder):
        self.encoder, self.forwards = encoder, []

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode_images(self, pixel_values, grid_thw):
        self.forwards.append(("encode_images", grid_thw.prod(dim=-1).tolist()))
        return self.encoder.encode_images(pixel_values, grid_thw)

    def encode_videos(self, pixel_values_videos, video_grid_thw):
        self.forwards.append(("encode_videos", video_grid_thw.prod(dim=-1).tolist()))
        return self.encoder.encode_videos(pixel_values_videos, video_grid_thw)


def test_encoder_knob_is_read_from_its_parameter():
    config = {"name": "mimo_encoder", "parameters": {"max_encoder_batch_patches": {"string_value": "123"}}}
    assert encoder_config(config) == EncoderConfig(max_encoder_batch_patches=123)
    with pytest.raises(ValueError, match="EncoderConfig.max_encoder_batch_patches must be a positive int, got 0"):
        EncoderConfig(max_encoder_batch_patches=0)
