"""The item metadata contract between the roles: canonical JSON, round trips, and refusals that name the field."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from mimo.epd.metadata import PROTOCOL_VERSION, ItemMetadata, MetadataError, content_hash
from mimo.processing.chat import MediaPart
from mimo.processing.config import ProcessorConfig, SpecialTokenIds
from mimo.processing.items import Modality
from mimo.processing.processor import preprocess_media
from processing_media import encode_audio, encode_image, encode_video, gradient_rgb, tone

CONFIG = ProcessorConfig(tokens=SpecialTokenIds(*range(9)))
IMAGE = encode_image(Image.fromarray(gradient_rgb(100, 70)), "PNG")
AUDIO = encode_audio(tone(440.0, 16000, 1.3), 16000, "wav")
VIDEO = encode_video(3.0, 10)  # 4 temporal groups of 4x6 patches, AAC sound: units [5, 5, 5, 3]
SILENT = encode_video(1.0, 4, sound_rate=None)


def metadata(modality: Modality, data: bytes, config: ProcessorConfig = CONFIG) -> ItemMetadata:
    item = preprocess_media(MediaPart(modality, data), config)
    return ItemMetadata.of(item, content_hash(modality, data, config), config)


@pytest.fixture(scope="module")
def video() -> ItemMetadata:
    return metadata(Modality.VIDEO, VIDEO)


def document(meta: ItemMetadata) -> dict:
    return json.loads(meta.to_json())


def encoded(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def test_each_modality_round_trips_through_json(video):
    for meta in (metadata(Modality.IMAGE, IMAGE), metadata(Modality.AUDIO, AUDIO), video,
                 metadata(Modality.VIDEO, SILENT)):  # fmt: skip
        assert ItemMetadata.from_json(meta.to_json(), CONFIG) == meta
        assert ItemMetadata.from_tensor(meta.to_tensor()[np.newaxis], CONFIG) == meta  # with a batch dimension
    assert document(metadata(Modality.IMAGE, IMAGE)) == {
        "version": PROTOCOL_VERSION, "modality": "image", "content_hash": content_hash(Modality.IMAGE, IMAGE, CONFIG),
        "num_tokens": 6, "grid_thw": [1, 4, 6]}  # fmt: skip
    assert set(document(metadata(Modality.AUDIO, AUDIO))) == {"version", "modality", "content_hash", "num_tokens"}
    doc = document(video)
    assert doc["grid_thw"] == [4, 4, 6] and doc["num_tokens"] == 4 * 6 + 18
    assert doc["video_timestamps"] == pytest.approx([0.0, 0.8, 1.7, 2.5]) and doc["second_per_grid_ts"] == 0.75
    assert doc["sound"] == {"audio_token_len": video.sound.audio_token_len, "segment_starts": [0, 5, 10, 15],
                            "segment_lens": [5, 5, 5, 3], "interleave_length": 0.0,
                            "unit_groups": [[0], [1], [2], [3]]}  # fmt: skip
    assert document(metadata(Modality.VIDEO, SILENT))["sound"] is None


def test_json_is_canonical(video):
    assert video.to_json() == ItemMetadata.from_json(encoded(document(video)), CONFIG).to_json()
    assert b" " not in video.to_json() and video.to_json().startswith(b'{"content_hash":')


def mutated(meta: ItemMetadata, path: tuple, value) -> bytes:
    doc = document(meta)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return encoded(doc)


@pytest.mark.parametrize("path,value,message", [
    (("version",), 2, "item_metadata.version is 2; this server speaks protocol version 1"),
    (("version",), KeyError, "item_metadata: missing field 'version'"),
    (("version",), True, r"item_metadata.version must be an integer >= 0, got True"),
    (("modality",), "pointcloud", r"item_metadata.modality must be one of \['audio', 'image', 'video'\]"),
    (("num_tokens",), KeyError, "missing field 'num_tokens'"),
    (("num_tokens",), 43, r"item_metadata.num_tokens is 43, but the item has 42 rows \(24 vision rows, grid_thw "
                          r"t\*h\*w / 4, \+ 18 rows of sound.segment_lens\)"),
    (("num_tokens",), "42", "item_metadata.num_tokens must be an integer >= 1"),
    (("content_hash",), "md5:00", "item_metadata.content_hash must be 'sha256:' \\+ 64 lowercase hex digits"),
    (("grid_thw",), [4, 4], r"item_metadata.grid_thw must be a list of 3 integers"),
    (("grid_thw",), [4, 3, 3], r"grid_thw \[4, 3, 3\]: h\*w must be a multiple of merge_size\*\*2 = 4"),
    (("video_timestamps",), [0.0, 0.8, 1.7], "video_timestamps must be a list of 4 numbers"),
    (("video_timestamps",), [0.0, 1.7, 0.8, 2.5], "video_timestamps must be non-negative and non-decreasing"),
    (("second_per_grid_ts",), 0, "second_per_grid_ts must be > 0"),
    (("sound", "segment_lens"), [5, 5, 5], r"item_metadata.sound.segment_lens must be a list of 4 integers"),
    (("sound", "segment_lens"), [5, 5, 5, 0], r"item_metadata.sound.segment_lens must hold integers >= 1"),
    (("sound", "segment_starts"), [0, 5, 10, 900], "sound: units .* must lie within audio_token_len"),
    (("sound", "unit_groups"), [[0, 1], [2, 3]], r"sound.unit_groups is \[\[0, 1\], \[2, 3\]\], but video_timestamps "
                                                 r"with interleave_length 0.0 group the units as \[\[0\], \[1\], "),
    (("sound", "interleave_length"), -2, "sound.interleave_length must be -1 or >= 0"),
    (("sound", "extra"), 1, "item_metadata.sound: unexpected field 'extra'"),
    (("sound",), [1], "item_metadata.sound must be null or a JSON object"),
    (("pixels",), [1.0], r"item_metadata: unexpected field 'pixels' \(the fields are"),
])
def test_bad_metadata_is_refused_naming_the_field(video, path, value, message):
    with pytest.raises(MetadataError, match=message):
        ItemMetadata.from_json(mutated(video, path, value), CONFIG)


def test_image_and_audio_fields_are_their_modalitys():
    image = metadata(Modality.IMAGE, IMAGE)
    with pytest.raises(MetadataError, match=r"an image has one temporal group \(t = 1\)"):
        ItemMetadata.from_json(mutated(image, ("grid_thw",), [2, 4, 6]), CONFIG)
    with pytest.raises(MetadataError, match=r"num_tokens is 7, but the item has 6 rows \(grid_thw t\*h\*w / 4\)"):
        ItemMetadata.from_json(mutated(image, ("num_tokens",), 7), CONFIG)
    with pytest.raises(MetadataError, match="unexpected field 'grid_thw'"):
        ItemMetadata.from_json(mutated(metadata(Modality.AUDIO, AUDIO), ("grid_thw",), [1, 4, 6]), CONFIG)


@pytest.mark.parametrize("raw,message", [
    (b"\xff\xfe", "item_metadata is not UTF-8 JSON"),
    (b"{", "item_metadata is not UTF-8 JSON"),
    (b"[1, 2]", "item_metadata must be a JSON object, got list"),
    (b'{"version": 1, "modality": "audio", "content_hash": "sha256:' + b"0" * 64 + b'", "num_tokens": NaN}',
     "NaN is not a finite number"),
])
def test_what_is_not_a_json_object_is_refused(raw, message):
    with pytest.raises(MetadataError, match=message):
        ItemMetadata.from_json(raw, CONFIG)


def test_the_tensor_holds_one_document(video):
    with pytest.raises(MetadataError, match="item_metadata must hold exactly one JSON document, got 2"):
        ItemMetadata.from_tensor(np.array([video.to_json()] * 2, dtype=np.object_), CONFIG)
    with pytest.raises(MetadataError, match="item_metadata must hold exactly one JSON document, got 0"):
        ItemMetadata.from_tensor(None, CONFIG)
    with pytest.raises(MetadataError, match="item_metadata must be BYTES, got str"):
        ItemMetadata.from_tensor(np.array(["{}"], dtype=np.object_), CONFIG)


def test_check_matches_names_the_first_differing_field(video):
    video.check_matches(ItemMetadata.from_json(video.to_json(), CONFIG), "the encoder")
    other = dataclasses.replace(video, grid_thw=(4, 6, 4))
    with pytest.raises(MetadataError, match=r"item_metadata.grid_thw: the encoder found \[4, 6, 4\], the metadata "
                                            r"says \[4, 4, 6\]"):
        video.check_matches(other, "the encoder")
    sound = dataclasses.replace(video.sound, segment_lens=(5, 5, 5, 2))
    with pytest.raises(MetadataError, match=r"item_metadata.sound.segment_lens: the encoder found \[5, 5, 5, 2\]"):
        video.check_matches(dataclasses.replace(video, sound=sound), "the encoder")
    with pytest.raises(MetadataError, match="item_metadata.sound: the encoder found None"):
        video.check_matches(dataclasses.replace(video, sound=None), "the encoder")


def test_content_hash_covers_the_bytes_and_the_settings_that_shape_the_rows():
    base = content_hash(Modality.IMAGE, IMAGE, CONFIG)
    assert base == content_hash(Modality.IMAGE, bytes(IMAGE), CONFIG)
    assert content_hash(Modality.IMAGE, IMAGE[:-1] + b"\x00", CONFIG) != base
    assert content_hash(Modality.VIDEO, IMAGE, CONFIG) != base
    for setting in ({"image_max_pixels": 64 * 1024}, {"image_mean": (0.0, 0.0, 0.0)}, {"fps": 1.0},
                    {"video_audio_interleave_length": 2.0}, {"audio_segment_size": 64}):  # fmt: skip
        assert content_hash(Modality.IMAGE, IMAGE, dataclasses.replace(CONFIG, **setting)) != base, setting
    for setting in ({"tokens": SpecialTokenIds(*range(10, 19))}, {"max_media_items": 2}, {"max_media_seconds": 5.0},
                    {"max_source_pixels": 10**6}):  # fmt: skip
        assert content_hash(Modality.IMAGE, IMAGE, dataclasses.replace(CONFIG, **setting)) == base, setting
