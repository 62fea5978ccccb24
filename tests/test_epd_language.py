"""Two encoder servers (the session's pair, tests/epd_layout.py) and one language server (`builders repository
--role encoder / language`) as real tritonserver processes on loopback: the colocated ensemble's exact tokens for
text-only, multi-image, audio and video-with-sound requests (greedy and seeded sampling, streamed and not); one
request's items spread over both encoder servers; 8 identical images encoded once; an encoder SIGKILLed mid-run
loses no request; a listed server that is not there is skipped; a hung (SIGSTOPped) one survived within the
deadline; no landing slice left in use."""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from client.sample_media import sample_image, sample_tone
from conftest import SERVED_MAX_MODEL_LEN, SERVING_DEVICE, serving_settings
from epd_layout import (QUESTION, assert_no_slice_in_use, colocated_tokens, encoded_items, metric, start_server,
                        stop_servers, tokens)  # fmt: skip
from mimo.serving.contract import triton_type
from processing_media import encode_video
from tools import traffic
from triton_harness import free_ports, server_binary_pid

IMAGES = [sample_image((200, 40, 40)), sample_image((30, 60, 220), (64, 96)), sample_image((10, 200, 90), (48, 48))]
TONE = sample_tone()
VIDEO = encode_video(2.0, 4)  # H.264 + AAC
REQUESTS = {
    "text": {},
    "images": {"images": IMAGES},
    "audio": {"audios": [TONE]},
    "video": {"videos": [VIDEO]},
}


@pytest.fixture(scope="module")
def layout(shared_encoders, tiny_checkpoint, tmp_path_factory):
    """[encoder, encoder] (the session's pair), language (listed the two by URL, and a watched file, empty at
    first)."""
    encoders = shared_encoders
    root = tmp_path_factory.mktemp("epd")
    urls_file = root / "encoders.txt"
    urls_file.write_text("# more encoder servers\n")
    language = start_server(serving_settings(tiny_checkpoint), root / "language", role="language",
                            encoder_urls=",".join(e.grpc_url for e in encoders), encoder_urls_file=str(urls_file),
                            encoder_timeout_ms=10000)  # fmt: skip
    yield encoders, language, urls_file
    stop_servers([language])


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("kind", sorted(REQUESTS))
def test_greedy_tokens_equal_the_colocated_ensemble(layout, triton_server, kind, stream):
    _, language, _ = layout
    kwargs = dict(REQUESTS[kind], max_tokens=8, temperature=0.0, stream=stream)
    assert tokens(language, **kwargs) == colocated_tokens(triton_server, **kwargs)
    assert_no_slice_in_use(language)


def test_seeded_sampling_equals_the_colocated_ensemble(layout, triton_server):
    _, language, _ = layout
    kwargs = {"images": IMAGES[:2], "audios": [TONE], "max_tokens": 10, "temperature": 1.0, "top_k": 50,
              "top_p": 0.95, "seed": 7}  # fmt: skip
    assert tokens(language, **kwargs) == colocated_tokens(triton_server, **kwargs)


def test_the_items_of_one_request_reach_both_encoder_servers(layout):
    encoders, language, _ = layout
    before = [encoded_items(e) for e in encoders]
    tokens(language, images=IMAGES, audios=[TONE], max_tokens=2, temperature=0.0)
    after = [encoded_items(e) for e in encoders]
    gained = [a - b for a, b in zip(after, before)]
    assert sum(gained) == 4 and min(gained) >= 1, gained
    # the rows landed in the pool's memory: the LM GPU's on a GPU deployment (CUDA IPC), host shm on CPU
    memory = "cuda" if SERVING_DEVICE == "gpu" else "system"
    landed = re.findall(r'^mimo_epd_handoff_bytes_total\{[^}]*memory="(\w+)"[^}]*\} ([0-9.e+-]+)$', language.metrics(),
                        re.M)  # fmt: skip
    assert {kind for kind, value in landed if float(value) > 0} == {memory}, landed


def test_the_table_reaches_mimo_llm_by_reference_from_the_pool(layout):
    """The pool is registered with the language server itself and mimo_llm's table input names a slice of it."""
    encoders, language, _ = layout
    tokens(language, images=IMAGES[:1], max_tokens=1, temperature=0.0)
    with grpcclient.InferenceServerClient(language.grpc_url) as client:
        status = (client.get_cuda_shared_memory_status() if SERVING_DEVICE == "gpu"
                  else client.get_system_shared_memory_status())  # fmt: skip
    assert [name for name in status.regions if "landing_" in name], status
    tables = dict(re.findall(r'^mimo_prompt_tables\{device="([^"]+)"\} (\S+)$', language.metrics(), re.M))
    expected = "cuda" if SERVING_DEVICE == "gpu" else "cpu"
    assert tables and all(device.startswith(expected) for device in tables), tables


def test_eight_identical_images_are_encoded_once(layout, triton_server):
    encoders, language, _ = layout
    before, hits = sum(encoded_items(e) for e in encoders), metric(language, "mimo_epd_dedup_hits_total")
    kwargs = {"images": [IMAGES[1]] * 8, "max_tokens": 6, "temperature": 0.0}
    assert tokens(language, **kwargs) == colocated_tokens(triton_server, **kwargs)
    assert sum(encoded_items(e) for e in encoders) - before == 1
    assert metric(language, "mimo_epd_dedup_hits_total") - hits == 7


def test_the_watched_file_changes_the_list_without_a_restart(layout, triton_server):
    """A server added through the watched file that refuses connections is skipped (its registration fails, it is
    down); once the file lists only it, requests with media fail naming it; text still runs; restored, all is well."""
    encoders, language, urls_file = layout
    (dead_port,) = free_ports(1)
    dead = f"127.0.0.1:{dead_port}"
    kwargs = {"images": IMAGES[:2], "max_tokens": 4, "temperature": 0.0}
    expected = colocated_tokens(triton_server, **kwargs)
    urls_file.write_text(f"{dead}\n")
    try:
        assert tokens(language, **kwargs) == expected
    finally:
        urls_file.write_text("")
    assert tokens(language, **kwargs) == expected
    assert_no_slice_in_use(language)


def test_a_hung_encoder_server_is_survived_within_the_deadline(layout, triton_server):
    """SIGSTOP: its requests pass their deadline and are retried on the other server on a fresh slice (the old one
    quarantined: the hung server may still write it); after SIGCONT it is probed ready and used again."""
    encoders, language, _ = layout
    kwargs = {"images": IMAGES, "audios": [TONE], "max_tokens": 4, "temperature": 0.0}
    expected = colocated_tokens(triton_server, **kwargs)
    retries = metric(language, "mimo_epd_retries_total")
    pid = server_binary_pid(encoders[1])
    os.kill(pid, signal.SIGSTOP)
    try:
        assert tokens(language, **kwargs) == expected
    finally:
        os.kill(pid, signal.SIGCONT)
    assert metric(language, "mimo_epd_retries_total") > retries
    before = encoded_items(encoders[1])
    for _ in range(10):  # probed in the background (each second): ready again, it takes work again
        assert tokens(language, **kwargs) == expected
        if encoded_items(encoders[1]) > before:
            break
    assert encoded_items(encoders[1]) > before, "the resumed server was not used again"
    assert_no_slice_in_use(language)


@pytest.mark.parametrize("tokens_first", [0, 3])
def test_a_client_that_leaves_frees_its_slice_and_kv(layout, tokens_first):
    """Cancelled while its items are encoded (0 tokens seen) or while it generates: nothing stays held."""
    _, language, _ = layout
    client = grpcclient.InferenceServerClient(language.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    arrays = {"text_input": np.array([[QUESTION.encode()]], dtype=np.object_),
              "image_bytes_input": np.array([IMAGES], dtype=np.object_),
              "max_tokens": np.array([[SERVED_MAX_MODEL_LEN // 2]], dtype=np.int64),
              "temperature": np.array([[0.0]], dtype=np.float32), "stream": np.array([[True]])}  # fmt: skip
    inputs = []
    for name, array in arrays.items():
        inputs.append(grpcclient.InferInput(name, list(array.shape), triton_type(array.dtype)))
        inputs[-1].set_data_from_numpy(array)
    client.async_stream_infer("ensemble", inputs)
    for _ in range(tokens_first):
        result, error = responses.get(timeout=120)
        assert error is None, error
    if tokens_first:  # generating: the table is in mimo_llm's request, the slice already free
        assert metric(language, "mimo_epd_landing_slices_in_use") == 0
    client.stop_stream(cancel_requests=True)
    client.close()
    assert_no_slice_in_use(language, timeout_s=60)
    deadline = time.monotonic() + 60
    while True:
        blocks = traffic.kv_blocks(language.metrics())
        if blocks and all(blocks[pool, "free"] == blocks[pool, "total"] for pool, _ in blocks):
            break
        assert time.monotonic() < deadline, f"KV blocks still held: {blocks}"
        time.sleep(0.1)



def test_an_item_every_server_refuses_fails_the_request_naming_each_cause(layout, tiny_checkpoint):
    """The orchestrator in-process over the two encoder servers: a plan whose grid the bytes do not give is refused
    by the first server, retried on the other, refused again; the error names both servers and the field, and the
    request's slice is back."""
    from mimo.config import MiMoV2Config
    from mimo.epd.landing import LandingPool, SystemShmRegion
    from mimo.epd.orchestrate import EncodeError, Orchestrator
    from mimo.epd.plan import RequestPlan, plan_request
    from mimo.processing.processor import MiMoProcessor

    encoders, _, _ = layout
    processor = MiMoProcessor.from_checkpoint(tiny_checkpoint)
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGES[1]}, {"type": "text", "text": "?"}]}]
    plan = plan_request(processor, messages)
    (item,) = plan.items
    t, h, w = item.metadata.grid_thw
    forged = dataclasses.replace(item, metadata=dataclasses.replace(item.metadata, grid_thw=(t, w, h)))
    assert (h, w) != (w, h), "the image must not be square"
    pool = LandingPool(SystemShmRegion(1 << 20, key_prefix="mimo_test_"))
    orchestrator = Orchestrator(pool, [e.grpc_url for e in encoders], None, processor.config,
                                MiMoV2Config.from_pretrained(tiny_checkpoint).hidden_size,
                                getattr(torch, serving_settings(tiny_checkpoint).resolved_dtype),
                                timeout_s=30, attempts=2)  # fmt: skip
    try:
        with pytest.raises(EncodeError) as error:
            orchestrator.encode(RequestPlan(plan.input_ids, [forged]))
        message = str(error.value)
        assert all(e.grpc_url in message for e in encoders) and message.count("grid_thw") == 2, message
        assert pool.stats().slices_in_use == 0
        lease = orchestrator.encode(plan)  # the true plan encodes (the servers are probed back up)
        assert orchestrator.table(lease, plan).shape == (1, item.metadata.num_tokens, orchestrator.hidden_size)
        lease.release()
    finally:
        orchestrator.close()
        pool.close()



def test_sigkill_of_an_encoder_server_mid_run_loses_no_request(layout, triton_server):
    """Last in this module: one encoder server is killed while requests run (the next module to take the session's
    pair starts it again); every one of 12 requests still gets the colocated tokens (its items retried on the other
    server)."""
    encoders, language, _ = layout
    kwargs = {"images": IMAGES, "audios": [TONE], "max_tokens": 4, "temperature": 0.0}
    expected = colocated_tokens(triton_server, **kwargs)
    retries = metric(language, "mimo_epd_retries_total")
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(tokens, language, **kwargs) for _ in range(12)]
        futures[0].result(timeout=300)  # mid-run: the others are queued or in flight
        os.kill(server_binary_pid(encoders[0]), signal.SIGKILL)  # the tritonserver binary itself
        results = [f.result(timeout=300) for f in futures]
    encoders[0].process.wait(60)
    assert results == [expected] * 12
    assert metric(language, "mimo_epd_retries_total") > retries
    assert tokens(language, **kwargs) == expected  # the dead server stays down; the other serves
    assert_no_slice_in_use(language)
