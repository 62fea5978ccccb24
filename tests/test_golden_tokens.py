"""Golden tokens: a fixed set of requests through the real server must keep producing the tokens recorded in
`golden_tokens.json` (recorded before the restructure; any refactoring has to keep them bit for bit).

Record anew only on purpose, on CPU: `MIMO_RECORD_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden_tokens.py
tests/test_serving_tensor_parallel.py`. The TP 2 request lives in test_serving_tensor_parallel.py (its server).
"""

from __future__ import annotations

import pytest
from conftest import SERVING_DEVICE
from golden import check_or_record

from client import GenerationSummary, MiMoClient
from client.sample_media import sample_image, sample_tone
from processing_media import encode_video

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


@pytest.mark.skipif(SERVING_DEVICE != "cpu", reason="golden tokens are float32 CPU tokens; the GPU runs compare "
                                                    "with the offline pipeline on their own device instead")
@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_served_tokens_equal_the_golden_record(triton_server, name):
    text, media, params = REQUESTS[name]
    check_or_record(name, served_tokens(triton_server.grpc_url, text, media, params))
