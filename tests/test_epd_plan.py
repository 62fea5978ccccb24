"""Language-side planning before encoding: from the raw bytes alone, every item's rows, grid, timestamps, units and
placeholder ids, and the request's prompt ids, exactly as the full preprocessing gives them.

The media and processor settings are those the processing and serving tests use (tests/processing_media.py
generators; test_processing_{image,audio,video,processor}.py and the served tiny checkpoint's settings).
"""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from mimo.epd.metadata import ItemMetadata, content_hash
from mimo.epd.plan import plan_request
from mimo.processing.errors import ProcessingError
from mimo.processing.items import Modality
from mimo.processing.processor import ContextBudget, MiMoProcessor
from mimo.serving.preprocess import plan_preprocessing, preprocess_request
from processing_media import encode_audio, encode_image, encode_video, gradient_rgb, tone, with_exif_orientation
from test_processing_processor import AUDIO, AUDIO_TOKENIZER, VISION, write_tiny_checkpoint


def _images() -> dict[str, bytes]:
    two_color = Image.new("RGB", (60, 40), (255, 0, 0))
    two_color.paste((0, 0, 255), (30, 0, 60, 40))
    rgba = np.zeros((40, 70, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    palette = Image.new("P", (50, 30), 0)
    frames = [Image.new("RGB", (40, 40), color) for color in ((255, 0, 0), (0, 255, 0))]
    exif_png = Image.Exif()
    exif_png[0x0112] = 6
    media = {
        **{f"{fmt.lower()}": encode_image(two_color, fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP")},
        **{f"exif{o}": with_exif_orientation(Image.new("RGB", (300, 100)), o) for o in range(1, 9)},
        "gradient_png": encode_image(Image.fromarray(gradient_rgb(100, 70)), "PNG"),
        "gradient_jpeg": encode_image(Image.fromarray(gradient_rgb(64, 64)), "JPEG"),
        "png_exif_rotated": encode_image(Image.new("RGB", (120, 40)), "PNG", exif=exif_png),
        "rgba": encode_image(Image.fromarray(rgba, "RGBA"), "PNG"),
        "la": encode_image(Image.new("LA", (30, 30)), "PNG"),
        "palette_transparent": encode_image(palette, "PNG", transparency=0),
        "animated_gif": encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "narrow": encode_image(Image.fromarray(gradient_rgb(33, 500)), "PNG"),  # scaled up to a 32 px side
        "large": encode_image(Image.new("RGB", (2048, 2048), (90, 90, 90)), "PNG"),
        "wide": encode_image(Image.fromarray(gradient_rgb(640, 480)), "PNG"),
        "small": encode_image(Image.new("RGB", (200, 120), (1, 2, 3)), "PNG"),
    }
    return media


def _audios() -> dict[str, bytes]:
    media = {f"{kind}_{rate}_{ch}": encode_audio(tone(1000.0, rate, 1.0, ch), rate, kind)
             for kind, rate, ch in (("wav", 16000, 1), ("wav", 44100, 2), ("flac", 22050, 1), ("flac", 48000, 2),
                                    ("mp3", 44100, 2), ("mp3", 16000, 1), ("opus", 48000, 2), ("opus", 16000, 1),
                                    ("m4a", 44100, 2), ("m4a", 24000, 1))}  # fmt: skip
    media.update({
        "adts_mono": encode_audio(tone(440.0, 16000, 0.5), 16000, "adts", codec="aac"),
        "adts_stereo": encode_audio(tone(440.0, 48000, 0.5, 2), 48000, "adts", codec="aac"),
        "flac_stereo_1.3s": encode_audio(tone(440.0, 16000, 1.3, 2), 16000, "flac"),
        "wav_24k_2.1s": encode_audio(tone(300.0, 24000, 2.1), 24000, "wav"),
        "m4a_3s": encode_audio(tone(440.0, 16000, 3.0), 16000, "m4a"),  # declares less than it decodes to
        # AAC decodes to more samples than its container declares (priming); at these lengths that is one token more
        "m4a_0.6s": encode_audio(tone(440.0, 16000, 0.6), 16000, "m4a"),
        "m4a_0.78s": encode_audio(tone(440.0, 16000, 0.78), 16000, "m4a"),
        "mkv_pcm_7.3s": encode_audio(tone(440.0, 16000, 7.3), 16000, "matroska", codec="pcm_s16le"),
    })
    return media


def _videos() -> dict[str, bytes]:
    pixels = np.zeros((64, 128, 3), dtype=np.uint8)
    pixels[:, :64] = (255, 0, 0)
    return {
        "sound_3s_10fps": encode_video(3.0, 10),
        "sound_2s_4fps": encode_video(2.0, 4),
        "sound_5s_320x240": encode_video(5.0, 8, width=320, height=240),
        "sound_1s_8fps": encode_video(1.0, 8),
        "silent_1s_4fps": encode_video(1.0, 4, sound_rate=None),
        "silent_3s_10fps": encode_video(3.0, 10, sound_rate=None),
        "single_frame": encode_video(0.1, 10, sound_rate=None),
        "rotated_90": encode_video(1.0, 4, width=128, height=64, sound_rate=None, rotation=90, frame_pixels=pixels),
        "rotated_270_sound": encode_video(2.0, 4, width=128, height=64, rotation=270),
    }


MEDIA = {Modality.IMAGE: _images(), Modality.AUDIO: _audios(), Modality.VIDEO: _videos()}
# processor settings (over the checkpoint's) that the processing tests run each modality with
SETTINGS = {
    Modality.IMAGE: [{}, {"image_max_pixels": 64 * 32 * 32}, {"image_min_pixels": 256 * 32 * 32}],
    Modality.AUDIO: [{}],
    Modality.VIDEO: [{}, {"video_audio_interleave_length": -1.0}, {"video_audio_interleave_length": 2.0},
                     {"video_audio_interleave_length": 2.0, "use_per_grid_t_timestamps": True},
                     {"video_total_max_pixels": 8 * 1024}, {"fps": 1.0, "min_frames": 3, "max_frames": 7},
                     {"num_frames": 4}],
}
CASES = [pytest.param(modality, name, settings, id=f"{modality.name.lower()}-{name}-{i}")
         for modality, media in MEDIA.items() for name in media for i, settings in enumerate(SETTINGS[modality])]
KIND = {Modality.IMAGE: "image", Modality.AUDIO: "audio", Modality.VIDEO: "video"}


@pytest.fixture(scope="module", params=["hub_defaults", "tiny_encoders"])
def base_processor(request, tmp_path_factory) -> MiMoProcessor:
    """The processor defaults (60 s audio segments), and the processing tests' tiny encoders (64-frame segments)."""
    directory = tmp_path_factory.mktemp(request.param)
    encoders = {"vision_config": VISION, "audio_config": AUDIO, "audio_tokenizer": AUDIO_TOKENIZER}
    write_tiny_checkpoint(directory, encoder_configs=encoders if request.param == "tiny_encoders" else None)
    return MiMoProcessor.from_checkpoint(directory)


def with_settings(processor: MiMoProcessor, settings: dict) -> MiMoProcessor:
    config = dataclasses.replace(processor.config, **settings)
    return MiMoProcessor(processor.tokenizer, config, model_type=processor.model_type, vocab_size=processor.vocab_size)


def messages_with(kind: str, data: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": kind, kind: data}, {"type": "text", "text": "Describe it."}]}]


def outcome(function):
    try:
        return function(), None
    except ProcessingError as error:
        return None, f"{type(error).__name__}: {error}"


@pytest.mark.parametrize("modality,name,settings", CASES)
def test_planned_item_and_prompt_equal_the_preprocessed(base_processor, modality, name, settings):
    processor = with_settings(base_processor, settings)
    messages = messages_with(KIND[modality], MEDIA[modality][name])
    processed, refused = outcome(lambda: processor.process(messages))
    planned, plan_refused = outcome(lambda: processor.process(messages, decode=False))
    assert plan_refused == refused
    if refused:
        return
    assert planned.input_ids == processed.input_ids  # placeholder runs, timestamps text included
    (planned_item,), (item,) = planned.items, processed.items
    assert planned_item.frames is None and planned_item.jpeg is None and planned_item.mel is None
    hash_ = content_hash(modality, MEDIA[modality][name], processor.config)
    assert ItemMetadata.of(planned_item, hash_, processor.config) == ItemMetadata.of(item, hash_, processor.config)
    assert processor.assign_prompt_table_ids(planned) == processor.assign_prompt_table_ids(processed)


def test_the_matrix_covers_refusals_and_rotations(base_processor):
    """The cases above include items both paths refuse and items whose grid only a decode-time rule sets."""
    refusals = [outcome(lambda: with_settings(base_processor, {"max_media_seconds": 0.5}).process(
        messages_with("audio", MEDIA[Modality.AUDIO]["wav_16000_1"]), decode=decode)) for decode in (True, False)]
    assert refusals[0][1] == refusals[1][1] and "longer than" in refusals[0][1]
    rotated = base_processor.process(messages_with("image", MEDIA[Modality.IMAGE]["exif6"]), decode=False).items[0]
    assert rotated.grid_thw.tolist() == [[1, 18, 6]]  # 300x100 displayed as 100x300
    video = base_processor.process(messages_with("video", MEDIA[Modality.VIDEO]["rotated_90"]), decode=False)
    assert video.items[0].video_grid_thw.tolist() == [[2, 8, 4]]


@pytest.mark.parametrize("data,message", [
    (encode_image(Image.fromarray(gradient_rgb(2010, 10)), "PNG"), "aspect ratio"),
    (encode_audio(tone(440.0, 16000, 0.01), 16000, "wav"), "audio is too short"),
    (encode_video(3.0, 10, sound_seconds=1.0), "ends before the frame group"),
    (b"\x00\x01garbage" * 100, "cannot open"),
], ids=["aspect", "short-audio", "short-soundtrack", "garbage"])
def test_planning_refuses_what_preprocessing_refuses(base_processor, data, message):
    kind = "image" if message == "aspect ratio" else "audio" if "audio" in message else "video"
    processed, refused = outcome(lambda: base_processor.process(messages_with(kind, data)))
    planned, plan_refused = outcome(lambda: base_processor.process(messages_with(kind, data), decode=False))
    assert refused is not None and message in refused and plan_refused == refused


def test_budget_refusals_are_the_same_before_and_after_decoding(base_processor):
    audio = MEDIA[Modality.AUDIO]["m4a_3s"]  # its container declares less than it decodes to
    messages = messages_with("audio", audio)
    exact = len(base_processor.process(messages).input_ids)
    for max_model_len in range(exact - 3, exact + 2):
        budget = ContextBudget(max_model_len, 1)
        assert outcome(lambda: base_processor.process(messages, budget=budget, decode=False))[1] == \
            outcome(lambda: base_processor.process(messages, budget=budget))[1]


def test_request_plan_lists_rows_slices_and_metadata(base_processor):
    media = [("image", MEDIA[Modality.IMAGE]["gradient_png"]), ("audio", MEDIA[Modality.AUDIO]["flac_stereo_1.3s"]),
             ("video", MEDIA[Modality.VIDEO]["sound_3s_10fps"]), ("image", MEDIA[Modality.IMAGE]["gradient_png"])]
    messages = [{"role": "user", "content": [{"type": k, k: d} for k, d in media] + [{"type": "text", "text": "?"}]}]
    plan = plan_request(base_processor, messages)
    table = base_processor.assign_prompt_table_ids(base_processor.process(messages))
    assert plan.input_ids == table.input_ids and plan.rows_per_item() == table.rows_per_item
    assert [item.first_row for item in plan.items] == list(np.cumsum([0] + table.rows_per_item[:-1]))
    assert plan.total_rows == sum(table.rows_per_item)
    assert [item.data for item in plan.items] == [d for _, d in media]
    first, *_, last = plan.items
    assert first.metadata == last.metadata  # identical bytes and settings: one hash (the dedup key)
    assert len({item.metadata.content_hash for item in plan.items}) == 3


def test_served_checkpoint_plans_what_preprocessing_sends(tiny_checkpoint):
    processor = MiMoProcessor.from_checkpoint(tiny_checkpoint)
    inputs = {"text_input": np.array([[b"Compare them."]], dtype=np.object_),
              "max_tokens": np.array([[8]], dtype=np.int32),
              "image_bytes_input": np.array([[MEDIA[Modality.IMAGE]["gradient_png"], MEDIA[Modality.IMAGE]["exif6"]]],
                                            dtype=np.object_),
              "audio_bytes_input": np.array([[MEDIA[Modality.AUDIO]["m4a_3s"]]], dtype=np.object_),
              "video_bytes_input": np.array([[MEDIA[Modality.VIDEO]["sound_2s_4fps"]]], dtype=np.object_),
              "stop_words": np.array([[b"stop"]], dtype=np.object_)}  # fmt: skip
    full = preprocess_request(processor, inputs, max_model_len=1024)
    llm_inputs, plan = plan_preprocessing(processor, inputs, max_model_len=1024)
    assert llm_inputs.keys() == {"input_ids", "input_lengths", "end_id", "pad_id", "stop_words_list"}
    for name, array in llm_inputs.items():
        np.testing.assert_array_equal(array, full[name], err_msg=name)
    np.testing.assert_array_equal(plan.rows_per_item(), full["num_tokens"][0])
    with pytest.raises(ProcessingError, match="exceeds max_model_len") as refused:
        preprocess_request(processor, inputs, max_model_len=64)
    with pytest.raises(ProcessingError, match="exceeds max_model_len") as plan_refused:
        plan_preprocessing(processor, inputs, max_model_len=64)
    assert str(plan_refused.value) == str(refused.value)
