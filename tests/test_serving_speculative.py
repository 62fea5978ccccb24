"""A real tritonserver whose mimo_llm drafts with the MTP layers (`num_speculative_tokens` rendered by `builders
repository`), at k = 1, 2 and 3: greedy text and multimodal requests, concurrent, give the tokens served without MTP;
a request can opt out; the acceptance counters reach the metrics port."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import SERVING_DEVICE, running_server, serving_settings
from golden import REQUESTS, golden, served_tokens

from client import MiMoClient
from mimo.serving.offline import OfflinePipeline
from mimo.serving.triton_config import torch_dtype
from tools import traffic

GREEDY_REQUESTS = ("text", "image", "audio", "multi_image")


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda k: f"k{k}")
def mtp_server(request, tiny_checkpoint, tmp_path_factory):
    """A server drafting k = 1, 2, 3 tokens per step (the tiny checkpoint has V2.5's three MTP layers)."""
    settings = serving_settings(tiny_checkpoint, num_speculative_tokens=request.param)
    with running_server(settings, tmp_path_factory.mktemp(f"serving_mtp{request.param}")) as server:
        server.num_speculative_tokens = request.param
        yield server


def expected_tokens(checkpoint, names) -> dict[str, list[int]]:
    """Tokens without MTP: the golden record on CPU, the offline pipeline on the GPU's own device."""
    if SERVING_DEVICE == "cpu":
        return {name: golden()[name] for name in names}
    offline = OfflinePipeline(checkpoint, torch_dtype(serving_settings(checkpoint).resolved_dtype), "cuda")
    return {name: offline.generate(REQUESTS[name][0], **REQUESTS[name][1], max_tokens=REQUESTS[name][2]["max_tokens"])
            for name in names}


def settled_spec_metrics(server, timeout_s: float = 30.0) -> dict[str, float]:
    """The `mimo_spec_*` values once the server is idle: every KV block free and the values unchanged for 0.3 s
    (mimo_llm publishes them once per cancellation period, a little after the responses go out)."""
    deadline = time.monotonic() + timeout_s
    previous = None
    while True:
        text = server.metrics()
        blocks = traffic.kv_blocks(text)
        values = {name: float(value) for name, value in re.findall(r"^mimo_spec_(\w+)(?:\{\})? (\S+)$", text,
                                                                   re.MULTILINE)}  # fmt: skip
        if values and values == previous and all(blocks[p, "free"] == blocks[p, "total"] for p, _ in blocks):
            return values
        assert time.monotonic() < deadline, f"not idle: {blocks}, {values}"
        previous = values
        time.sleep(0.3)


def test_greedy_tokens_equal_those_served_without_mtp(mtp_server, tiny_checkpoint):
    expected = expected_tokens(tiny_checkpoint, GREEDY_REQUESTS)
    with ThreadPoolExecutor(len(GREEDY_REQUESTS)) as pool:
        futures = {name: pool.submit(served_tokens, mtp_server.grpc_url, *REQUESTS[name]) for name in GREEDY_REQUESTS}
    assert {name: future.result() for name, future in futures.items()} == expected
    metrics = settled_spec_metrics(mtp_server)  # also: every KV block is free again
    assert metrics["verifications"] > 0
    if mtp_server.num_speculative_tokens > 1:
        assert metrics["draft_tokens"] > metrics["verifications"]  # chains of k drafts were verified
    else:
        assert metrics["draft_tokens"] == metrics["verifications"]
    assert metrics["acceptance_rate"] == pytest.approx(metrics["accepted_tokens"] / metrics["draft_tokens"])
    assert metrics["accept_length"] == pytest.approx(1 + metrics["accepted_tokens"] / metrics["verifications"])


def test_a_request_opts_out_of_speculation(mtp_server, tiny_checkpoint):
    text, media, params = REQUESTS["image"]
    expected = expected_tokens(tiny_checkpoint, ["image"])["image"]
    before = settled_spec_metrics(mtp_server)
    with MiMoClient(mtp_server.grpc_url, "grpc") as client:
        *_, summary = client.generate(text, **media, **params, speculative_decoding=False)
        assert summary.token_ids == expected
        assert settled_spec_metrics(mtp_server)["draft_tokens"] == before["draft_tokens"]
        *_, summary = client.generate(text, **media, **params)
        assert summary.token_ids == expected
    assert settled_spec_metrics(mtp_server)["draft_tokens"] > before["draft_tokens"]
