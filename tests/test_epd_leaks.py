"""2,000 requests through two encoder servers and one language server (real tritonserver processes on loopback),
mixed: text only, 1 to 3 small images, audio, image + audio; streamed and whole; clients that cancel while their
items are encoded or while they generate; bad requests; one encoder server SIGKILLed a third of the way through and
started again on its address two thirds of the way. Then nothing may be held: no landing slice, no KV block, no
request in flight, no registered shared-memory region but the language server's landing pool (on the encoder
servers and the language server itself), one landing region in /dev/shm; every request got its expected tokens or the error its input deserves."""

from __future__ import annotations

import os
import queue
import random
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client import GenerationError, MiMoClient
from client.sample_media import sample_image, sample_tone
from conftest import serving_settings
from epd_layout import assert_no_slice_in_use, encoded_items, restart, start_server, stop_servers
from mimo.serving.contract import triton_type
from tools import traffic
from tools.server_process import TritonServer
from triton_harness import server_binary_pid, shm_prefix, shm_regions

REQUESTS = int(os.environ.get("MIMO_EPD_LEAK_REQUESTS", "2000"))
WORKERS = 16
MAX_TOKENS = 3
IMAGES = [sample_image((200, 40, 40), (32, 32)), sample_image((30, 60, 220), (32, 48)),
          sample_image((10, 200, 90), (48, 32))]  # fmt: skip
TONE = sample_tone(330.0, 0.3)
VARIANTS = {
    "text": {},
    "image": {"images": IMAGES[:1]},
    "images2": {"images": IMAGES[:2]},
    "images3": {"images": IMAGES},
    "audio": {"audios": [TONE]},
    "image+audio": {"images": IMAGES[1:2], "audios": [TONE]},
}
BAD = (  # (what is sent, words the error must contain)
    ({"text": "Look", "images": [b"\x89PNG\r\n\x1a\n broken"]}, "image"),
    ({"text": "Listen", "audios": [b"RIFF...."]}, "audio"),
    ({"text": "Hi<|im_end|>"}, "control token"),
    ({"text": "Long", "max_tokens": 1 << 20}, "max_model_len"),
)
ACTIONS = {"complete": 12, "whole": 3, "cancel_encoding": 2, "cancel_generating": 2, "bad": 2}  # weights


@pytest.fixture(scope="module")
def layout(shared_encoders, tiny_checkpoint, tmp_path_factory, ucx_tcp):
    """The session's encoder pair (ucx_tcp: the one restarted here starts as the pair did) and a language server."""
    root = tmp_path_factory.mktemp("epd_leaks")
    language = start_server(serving_settings(tiny_checkpoint), root / "language", role="language",
                            encoder_urls=",".join(e.grpc_url for e in shared_encoders))  # fmt: skip
    yield {"encoders": shared_encoders, "language": language, "root": root}
    stop_servers([language])


def complete(url: str, variant: str, stream: bool) -> list[int]:
    with MiMoClient(url, "grpc", response_timeout_s=120) as client:
        *_, summary = client.generate(f"Request with {variant}", **VARIANTS[variant], max_tokens=MAX_TOKENS,
                                      temperature=0.0, stream=stream)  # fmt: skip
    return summary.token_ids


def cancel_while_encoding(url: str, rng: random.Random) -> None:
    """Sends a request with images and cancels its stream before (or just as) the first response comes."""
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: None)
    arrays = {"text_input": np.array([[b"Leaving"]], dtype=np.object_),
              "image_bytes_input": np.array([IMAGES], dtype=np.object_),
              "max_tokens": np.array([[64]], dtype=np.int64), "stream": np.array([[True]])}  # fmt: skip
    inputs = []
    for name, array in arrays.items():
        inputs.append(grpcclient.InferInput(name, list(array.shape), triton_type(array.dtype)))
        inputs[-1].set_data_from_numpy(array)
    client.async_stream_infer("ensemble", inputs)
    time.sleep(rng.uniform(0.0, 0.2))
    client.stop_stream(cancel_requests=True)
    client.close()


def cancel_while_generating(url: str, variant: str) -> None:
    with MiMoClient(url, "grpc", response_timeout_s=120) as client:
        stream = client.generate(f"Leaving {variant}", **VARIANTS[variant], max_tokens=256, temperature=0.0)
        next(stream)  # the first token
        stream.close()  # the client leaves: its stream is cancelled


def bad_request(url: str, rng: random.Random) -> None:
    kwargs, words = rng.choice(BAD)
    with MiMoClient(url, "grpc", response_timeout_s=120) as client:
        try:
            list(client.generate(**{"max_tokens": MAX_TOKENS, **kwargs}))
        except GenerationError as error:
            assert words in str(error), f"refusal of {kwargs} without {words!r}: {error}"
        else:
            raise AssertionError(f"bad request {kwargs} was accepted")


def registered_regions(server: TritonServer) -> list[str]:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        system = client.get_system_shared_memory_status().regions
        cuda = client.get_cuda_shared_memory_status().regions
    return sorted([*system, *cuda])


def test_two_thousand_mixed_requests_leave_nothing_held(layout):
    encoders, language, root = layout["encoders"], layout["language"], layout["root"]
    url = language.grpc_url
    expected = {(variant, stream): complete(url, variant, stream) for variant in VARIANTS for stream in (True, False)}
    rng = random.Random(12)
    actions = rng.choices(list(ACTIONS), weights=list(ACTIONS.values()), k=REQUESTS)
    counts: Counter = Counter()
    failures: list[str] = []
    done = queue.Queue()
    lock = threading.Lock()

    def run(index: int, action: str) -> None:
        local = random.Random(index)
        variant = local.choice(sorted(VARIANTS))
        try:
            if action in ("complete", "whole"):
                stream = action == "complete"
                found = complete(url, variant, stream)
                assert found == expected[variant, stream], f"{variant}: {found} != {expected[variant, stream]}"
            elif action == "cancel_encoding":
                cancel_while_encoding(url, local)
            elif action == "cancel_generating":
                cancel_while_generating(url, variant)
            else:
                bad_request(url, local)
        except Exception as error:  # noqa: BLE001 - collected: every request must end as expected
            with lock:
                failures.append(f"#{index} {action} {variant}: {type(error).__name__}: {error}")
        with lock:
            counts[action] += 1
        done.put(index)

    started = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool, ThreadPoolExecutor(1) as restarter:
        for index, action in enumerate(actions):
            pool.submit(run, index, action)
        for finished in range(1, REQUESTS + 1):
            done.get(timeout=300)
            if finished == REQUESTS // 3:
                os.kill(server_binary_pid(encoders[1]), signal.SIGKILL)
                encoders[1].process.wait(60)
            if finished == 2 * REQUESTS // 3:  # the traffic goes on while it starts
                restarted = restarter.submit(restart, encoders[1], root / "encoder1_restarted.log")
        elapsed = time.monotonic() - started
        encoders[1] = restarted.result(timeout=300)  # in the session's pair too
    print(f"{REQUESTS} requests in {elapsed:.0f} s: {dict(counts)}")
    assert failures == [], failures[:20]
    assert sum(counts.values()) == REQUESTS and set(counts) == set(ACTIONS), counts
    deadline = time.monotonic() + 15  # probed in the background (each second): ready again, it takes work again
    while not encoded_items(encoders[1]):
        assert time.monotonic() < deadline, "the restarted encoder server was not used again within 15 s"
        assert complete(url, "images3", True) == expected["images3", True]

    assert_no_slice_in_use(language)
    deadline = time.monotonic() + 30
    while True:
        held = {k: v for k, v in traffic.held_resources(language.metrics(), ("ensemble", "mimo_llm")).items() if v}
        if not held:
            break
        assert time.monotonic() < deadline, f"still held: {held}"
        time.sleep(0.1)
    landing = [name for name in shm_regions(shm_prefix(language)) if "landing_" in name]
    assert len(landing) == 1, landing  # the pool itself, nothing else
    for encoder in (language, *encoders):  # mimo_llm's table inputs name the pool on the language server too
        assert set(registered_regions(encoder)) <= set(landing), registered_regions(encoder)
    assert complete(url, "images3", True) == expected["images3", True]  # still serving, the same tokens
