"""Through the real server: requests that cannot fit the context are refused before their media are decoded (within
1 s, the reliability issue's bound) while a text request goes on unaffected; a slow media item does not hold up
other requests; and the internal models, called directly, refuse what the entry never sends them."""

from __future__ import annotations

import dataclasses
import threading
import time

import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from builders.repository import RepositorySettings, render_repository
from client import GenerationError
from client.sample_media import sample_image
from conftest import SERVED_MAX_MODEL_LEN, serving_settings
from mimo.config import MiMoV2Config
from mimo.processing.items import PACKED_MEDIA_TENSORS
from mimo.processing.processor import MiMoProcessor
from mimo.serving.contract import EMBEDDING_DTYPES, triton_type
from mimo.serving.lifecycle import IN_FLIGHT_METRIC
from mimo.serving.preprocess import preprocess_request
from processing_media import encode_audio, encode_image, tone
from test_processing_early_refusal import silent_wav
from test_serving_e2e import assert_still_serving, client_for, raw_grpc_error, run
from tools import traffic

TEXT_ONLY = {"text": "Tell me a short story about the sea.", "max_tokens": 8, "temperature": 0.0}


class Background(threading.Thread):
    """One request on its own thread: its tokens or error, and when it ended."""

    def __init__(self, server, **request):
        super().__init__(daemon=True)
        self.server, self.request = server, request
        self.summary = self.error = self.ended = None

    def run(self):
        try:
            with client_for(self.server, "grpc") as client:
                self.summary = run(client, **self.request)[1]
        except GenerationError as error:
            self.error = error
        self.ended = time.monotonic()

    def result(self, timeout_s: float = 120.0):
        self.join(timeout_s)
        assert not self.is_alive(), "the request did not end"
        return self


@pytest.fixture(scope="module")
def solo_text_tokens(triton_server) -> list[int]:
    solo = Background(triton_server, **TEXT_ONLY)
    solo.start()
    return solo.result().summary.token_ids


LATE_REFUSALS = {  # what the issue saw decoded in full before mimo_llm refused it
    "an hour of audio": {"audios": [silent_wav(59 * 60)]},  # 28 MB, 46 s to decode and mel
    "sixteen 2048x2048 images": {"images": [encode_image(Image.new("RGB", (2048, 2048), (90, 90, 90)), "PNG")] * 16},
}


@pytest.mark.parametrize("media", LATE_REFUSALS.values(), ids=LATE_REFUSALS.keys())
def test_what_cannot_fit_is_refused_before_decoding_while_text_goes_on(triton_server, solo_text_tokens, media):
    text = Background(triton_server, **TEXT_ONLY)
    text.start()
    with client_for(triton_server, "grpc") as client:
        with pytest.raises(GenerationError) as refused:
            run(client, "Describe it.", max_tokens=16, **media)
    # refused from the media's headers, before any of it is decoded (no timing assert: the upload alone of an hour
    # of audio took 1.2 s on a loaded 2-core machine)
    assert f"exceeds max_model_len {SERVED_MAX_MODEL_LEN}" in str(refused.value)
    assert "before decoding" in str(refused.value)
    assert text.result().summary.token_ids == solo_text_tokens
    assert_still_serving(triton_server)


def test_a_slow_media_request_does_not_hold_up_a_text_request(triton_server, solo_text_tokens):
    # 140 s of 96 kHz stereo fits the context (~875 audio tokens) and takes seconds to decode, resample and mel on
    # a small CPU. The property is only observable where that is slow next to a text request, so both are timed
    # alone first (the text request starts 0.5 s after the slow one).
    slow_request = dict(text="What do you hear?", max_tokens=2, temperature=0.0,
                        audios=[encode_audio(tone(440.0, 96000, 140.0, 2), 96000, "flac")])  # fmt: skip
    solo_s = {}
    for name, request in (("text", TEXT_ONLY), ("slow", slow_request)):
        solo = Background(triton_server, **request)
        solo_started = time.monotonic()
        solo.start()
        assert solo.result().summary is not None, solo.error
        solo_s[name] = solo.ended - solo_started
    if solo_s["slow"] < 0.5 + 3 * solo_s["text"]:
        pytest.skip(f"the slow media request took {solo_s['slow']:.2f} s, a text request {solo_s['text']:.2f} s: "
                    "too close here for one to hold the other up")
    slow = Background(triton_server, **slow_request)
    slow.start()
    time.sleep(0.5)  # the audio is in preprocessing now
    text = Background(triton_server, **TEXT_ONLY)
    text.start()
    assert text.result().summary.token_ids == solo_text_tokens
    assert slow.result().summary is not None, slow.error
    assert text.ended < slow.ended, "the text request waited for the audio's preprocessing"


def raw_inputs(arrays: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, str]]:
    return {name: (array, triton_type(array.dtype)) for name, array in arrays.items()}


@pytest.mark.parametrize("ids, name, bad", [
    ({"output_ids": [[[5, 10**6]]], "preceding_ids": [[[7]]]}, "output_ids", 10**6),
    ({"output_ids": [[[5]]], "preceding_ids": [[[-7]]]}, "preceding_ids", -7),
])  # fmt: skip
def test_postprocessing_refuses_ids_outside_the_vocabulary(triton_server, tiny_checkpoint, ids, name, bad):
    arrays = {key: np.array(value, dtype=np.int32) for key, value in ids.items()}
    arrays["finish_reason"] = np.array([[b"length"]], dtype=np.object_)
    vocab_size = MiMoProcessor.from_checkpoint(tiny_checkpoint).vocab_size
    message = raw_grpc_error(triton_server, raw_inputs(arrays), model="postprocessing")
    assert f"{name} holds {bad}, not a token id (the vocabulary is [0, {vocab_size}))" in message
    assert_still_serving(triton_server)


@pytest.fixture(scope="module")
def packed_image_and_audio(tiny_checkpoint) -> dict[str, np.ndarray]:
    inputs = {"text_input": np.array([[b"Look and listen"]], dtype=np.object_),
              "image_bytes_input": np.array([[sample_image()]], dtype=np.object_),
              "audio_bytes_input": np.array([[encode_audio(tone(440.0, 16000, 1.0), 16000)]], dtype=np.object_)}
    outputs = preprocess_request(MiMoProcessor.from_checkpoint(tiny_checkpoint), inputs, SERVED_MAX_MODEL_LEN)
    return {name: outputs[name] for name in PACKED_MEDIA_TENSORS}


def poisoned(packed: dict[str, np.ndarray], name: str, value: float) -> dict[str, np.ndarray]:
    array = packed[name].copy()
    array[0, 0, 0] = value
    return {**packed, name: array}


@pytest.mark.parametrize("change, message", [
    (lambda packed: poisoned(packed, "mel", np.inf), "'mel' holds non-finite values"),
    (lambda packed: {**packed, "frame_shape": packed["frame_shape"] * np.array([1, 1, 2])}, "frames hold"),
    (lambda packed: {**packed, "grid_thw": packed["grid_thw"] * np.array([1, 2, 1])}, "give grid_thw"),
    (lambda packed: {**packed, "grid_thw": np.concatenate([packed["grid_thw"]] * 2, axis=1),
                     "grid_thw_rows": np.array([[2, -1]])}, "'grid_thw_rows' must be 1 or -1 per item"),
    (lambda packed: {**packed, "mel_rows": np.array([[3, packed["mel_rows"][0, 1] - 3]])},
     "item 0 (image) has ['frame_shape', 'frames', 'grid_thw', 'mel']"),
    (lambda packed: {**packed, "frames": packed["frames"][:, :-1]}, "'frames' has"),
])  # fmt: skip
def test_mimo_encoder_refuses_non_finite_or_inconsistent_media(triton_server, packed_image_and_audio, change, message):
    assert message in raw_grpc_error(triton_server, raw_inputs(change(packed_image_and_audio)), model="mimo_encoder")
    assert_still_serving(triton_server)


TABLE_TYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}  # numpy's, for the wire


@pytest.mark.parametrize("rows, width, value, message", [
    (3, None, np.nan, "prompt_embedding_table holds non-finite values (NaN or inf)"),
    (3, None, -np.inf, "prompt_embedding_table holds non-finite values (NaN or inf)"),
    (3, 7, 0.0, "prompt_embedding_table must be [1, P, {hidden}] (the model's hidden size), got [1, 3, 7]"),
])  # fmt: skip
def test_mimo_llm_refuses_a_bad_prompt_table(triton_server, tiny_checkpoint, rows, width, value, message):
    hidden = MiMoV2Config.from_pretrained(tiny_checkpoint).hidden_size
    vocab_size = MiMoProcessor.from_checkpoint(tiny_checkpoint).vocab_size
    served = serving_settings(tiny_checkpoint).resolved_dtype
    dtype, triton_dtype = TABLE_TYPES[served], EMBEDDING_DTYPES[served]
    arrays = raw_inputs({
        "input_ids": np.array([[1, 2, vocab_size]], dtype=np.int32),
        "request_output_len": np.array([[2]], dtype=np.int32),
        "prompt_vocab_size": np.array([[rows]], dtype=np.int32),
    })  # fmt: skip
    arrays["prompt_embedding_table"] = (np.full((1, rows, width or hidden), value).astype(dtype), triton_dtype)
    assert message.format(hidden=hidden) in raw_grpc_error(triton_server, arrays, model="mimo_llm")
    assert_still_serving(triton_server)


def test_preprocessing_has_several_unbatched_instances_and_postprocessing_one(tiny_checkpoint, tmp_path):
    settings = dataclasses.replace(serving_settings(tiny_checkpoint), preprocessing_instances=3)
    render_repository(settings, tmp_path / "repo")
    preprocessing = (tmp_path / "repo" / "preprocessing" / "config.pbtxt").read_text()
    postprocessing = (tmp_path / "repo" / "postprocessing" / "config.pbtxt").read_text()
    assert "instance_group [ { count: 3 kind: KIND_CPU } ]" in preprocessing
    assert "dynamic_batching" not in preprocessing  # a batch would make each request wait for the slowest of it
    assert "instance_group [ { count: 1 kind: KIND_CPU } ]" in postprocessing  # a stream's pieces stay in order
    assert RepositorySettings(checkpoint=tiny_checkpoint).preprocessing_instances >= 2


def test_the_entry_renders_its_instances_and_refuses_none(tiny_checkpoint, tmp_path):
    settings = dataclasses.replace(serving_settings(tiny_checkpoint), entry_instances=3)
    render_repository(settings, tmp_path / "repo")
    assert "instance_group [ { count: 3 kind: KIND_CPU } ]" in (tmp_path / "repo" / "ensemble" / "config.pbtxt").read_text()
    for name in ("entry_instances", "entry_workers", "encoder_instances", "preprocessing_instances", "max_batch"):
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be at least 1, got 0"):
            dataclasses.replace(settings, **{name: 0})


def test_each_entry_instance_has_its_in_flight_series(triton_server):
    """The suite's server runs two entry instances: one gauge series each (one shared series would hold whichever
    instance set it last), which the launcher's drain and `held_resources` add up."""
    found = traffic.series(triton_server.metrics(), IN_FLIGHT_METRIC, model="ensemble")
    instances = {labels.get("instance") for labels, _ in found}
    assert len(found) == 2 and len(instances) == 2 and None not in instances, found
