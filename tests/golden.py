"""The golden-token record (`golden_tokens.json`) and its requests, shared by the tests that check served tokens
against it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import SERVING_DEVICE
from processing_media import encode_video

from client import GenerationSummary, MiMoClient
from client.sample_media import sample_image, sample_tone

GOLDEN_FILE = Path(__file__).with_name("golden_tokens.json")
RECORD = os.environ.get("MIMO_RECORD_GOLDEN") == "1"


def golden() -> dict[str, list[int]]:
    return json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {}


def check_or_record(name: str, token_ids: list[int]) -> None:
    """Assert `token_ids` equal the recorded ones (or record them when MIMO_RECORD_GOLDEN=1, on CPU only)."""
    if RECORD:
        assert SERVING_DEVICE == "cpu", "golden tokens are recorded on CPU"
        records = golden()
        records[name] = token_ids
        lines = [f"  {json.dumps(key)}: {json.dumps(records[key])}" for key in sorted(records)]
        GOLDEN_FILE.write_text("{\n" + ",\n".join(lines) + "\n}\n")
        return
    records = golden()
    assert name in records, f"no golden tokens recorded for {name!r} in {GOLDEN_FILE.name}"
    assert token_ids == records[name], f"{name}: served tokens changed"


RED, BLUE = sample_image((200, 40, 40)), sample_image((30, 60, 220), (64, 96))
GREEN = sample_image((40, 180, 60), (128, 48))
GREEDY = {"temperature": 0.0}
# name -> (text, media, generation parameters)
REQUESTS = {
    "text": ("Tell me a short story about the sea.", {}, {"max_tokens": 16, **GREEDY}),
    "image": ("What do you see?", {"images": [RED]}, {"max_tokens": 12, **GREEDY}),
    "audio": ("What do you hear?", {"audios": [sample_tone(440.0, 1.5)]}, {"max_tokens": 12, **GREEDY}),
    "video_with_sound": ("What happens in the video?", {"videos": [encode_video(2.0, 4)]}, {"max_tokens": 10, **GREEDY}),
    "multi_image": ("Compare the pictures.", {"images": [RED, BLUE, GREEN]}, {"max_tokens": 12, **GREEDY}),
    "image_and_audio_seeded": ("Describe both.", {"images": [BLUE], "audios": [sample_tone(220.0)]},
                               {"max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 7}),
}

def served_tokens(url: str, text: str, media: dict, params: dict) -> list[int]:
    with MiMoClient(url, "grpc") as client:
        *_, summary = client.generate(text, **media, **params)
    assert isinstance(summary, GenerationSummary)
    return summary.token_ids
