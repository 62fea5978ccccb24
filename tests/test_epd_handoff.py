"""handoff nixl and grpc end to end: two encoder servers (the session's pair) and a language server per mode
(`builders repository --role language --handoff nixl|grpc`) as real tritonserver processes on loopback, NIXL over
UCX TCP (UCX_TLS=tcp; on a GPU also cuda_ipc, the language pool in mimo_llm's GPU memory: VRAM to VRAM): the colocated
ensemble's exact tokens (the comparison of tests/test_epd_language.py, which covers shm); one request's items on
both encoder servers; no shared memory registered with them; the counters by mode. And the encoder server's
encode_item_nixl alone: it refuses a descriptor that is not the declared size (nothing written), and writes exactly
the rows encode_item sends back."""

from __future__ import annotations

import re
from functools import partial

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import serving_settings
from epd_layout import (assert_no_slice_in_use, colocated_tokens, in_parallel, metric, start_server, stop_servers,
                        tokens)  # fmt: skip
from mimo.epd.handoff import (ENCODE_ITEM_NIXL, NIXL_AGENT, NIXL_AGENT_METADATA, NIXL_DESCRIPTOR, HANDOFF_US,
                              TABLE, TABLE_SHAPE, item_inputs)  # fmt: skip
from mimo.epd.item_encoding import ENCODER_METADATA
from mimo.epd.nixl_transfer import LandingAgent
from mimo.epd.plan import plan_request
from mimo.processing.processor import MiMoProcessor
from mimo.serving.triton_config import torch_dtype
from test_epd_language import IMAGES, REQUESTS, TONE
from nixl_peer import LocalRegion

TIMEOUT_S = 120
MODES = ("nixl", "grpc")


@pytest.fixture(scope="module")
def encoders(shared_encoders):
    return shared_encoders


@pytest.fixture(scope="module")
def languages(encoders, tiny_checkpoint, tmp_path_factory, ucx_tcp):
    """A language server per mode, started side by side."""

    def start(mode, root):
        server = start_server(serving_settings(tiny_checkpoint), root, role="language", handoff=mode,
                              encoder_urls=",".join(e.grpc_url for e in encoders), encoder_timeout_ms=10000)
        server.mode = mode
        return server

    roots = [tmp_path_factory.mktemp(f"language_{mode}") for mode in MODES]
    servers = dict(zip(MODES, in_parallel(*(partial(start, mode, root) for mode, root in zip(MODES, roots)))))
    yield servers
    stop_servers(servers.values())


@pytest.fixture(scope="module", params=MODES)
def language(request, languages):
    server = languages[request.param]
    yield server
    stop_servers([server])  # a mode's tests run together: done (and idle, nixl's progress threads spin)


def successes(server, model: str) -> int:
    found = re.search(rf'nv_inference_request_success\{{model="{model}",version="1"\}} (\d+)', server.metrics())
    return int(found.group(1)) if found else 0


def served_model(mode: str) -> str:
    return ENCODE_ITEM_NIXL if mode == "nixl" else "encode_item"


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("kind", sorted(REQUESTS))
def test_greedy_tokens_equal_the_colocated_ensemble(language, triton_server, kind, stream):
    kwargs = dict(REQUESTS[kind], max_tokens=8, temperature=0.0, stream=stream)
    assert tokens(language, **kwargs) == colocated_tokens(triton_server, **kwargs)
    assert_no_slice_in_use(language)


def test_seeded_sampling_equals_the_colocated_ensemble(language, triton_server):
    kwargs = {"images": IMAGES[:2], "audios": [TONE], "max_tokens": 10, "temperature": 1.0, "top_k": 50,
              "top_p": 0.95, "seed": 7}  # fmt: skip
    assert tokens(language, **kwargs) == colocated_tokens(triton_server, **kwargs)


def test_items_reach_both_encoders_without_shared_memory_and_are_counted_by_mode(language, encoders):
    model = served_model(language.mode)
    before = [successes(e, model) for e in encoders]
    handoff = rf'^mimo_epd_handoff_bytes_total\{{[^}}]*mode="{language.mode}"[^}}]*\}} ([0-9.e+]+)$'

    def handoff_bytes() -> float:  # the counter exists from its first count on
        return sum(float(value) for value in re.findall(handoff, language.metrics(), re.M))

    bytes_before = handoff_bytes()
    transfers = metric(language, "mimo_epd_nixl_transfers_total")
    tokens(language, images=IMAGES, audios=[TONE], max_tokens=2, temperature=0.0)
    gained = [successes(e, model) - b for e, b in zip(encoders, before)]
    assert sum(gained) == 4 and min(gained) >= 1, gained
    assert handoff_bytes() > bytes_before
    if language.mode == "nixl":
        assert metric(language, "mimo_epd_nixl_transfers_total") - transfers == 4
        assert metric(language, "mimo_epd_nixl_transfer_microseconds_total") > 0
    else:
        assert metric(language, "mimo_epd_nixl_transfers_total") == 0
    for encoder in encoders:  # nothing was registered with the encoder servers
        client = grpcclient.InferenceServerClient(encoder.grpc_url)
        assert not client.get_system_shared_memory_status(as_json=True).get("regions")
        client.close()
    assert_no_slice_in_use(language)


@pytest.fixture(scope="module")
def landing(ucx_tcp):
    """A landing region of this process registered by a NIXL agent, as the language server's."""
    region = LocalRegion(1 << 20)
    agent = LandingAgent(region)
    yield region, agent
    agent.close()
    region.close()


def nixl_inputs(item, agent: LandingAgent, descriptor: np.ndarray, declared: int) -> list:
    inputs = item_inputs(grpcclient, item.data, item.metadata.to_json(), declared)
    for name, array, dtype in ((NIXL_AGENT, np.array([[agent.name.encode()]], dtype=np.object_), "BYTES"),
                               (NIXL_AGENT_METADATA, agent.metadata_array[np.newaxis], "UINT8"),
                               (NIXL_DESCRIPTOR, descriptor[np.newaxis], "INT64")):  # fmt: skip
        inputs.append(grpcclient.InferInput(name, list(array.shape), dtype))
        inputs[-1].set_data_from_numpy(array)
    return inputs


def test_encode_item_nixl_refuses_a_wrong_descriptor_and_writes_the_rows_encode_item_sends(encoders, landing,
                                                                                          tiny_checkpoint):  # fmt: skip
    region, agent = landing
    processor = MiMoProcessor.from_checkpoint(tiny_checkpoint)
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGES[1]}, {"type": "text", "text": "?"}]}]
    (item,) = plan_request(processor, messages).items
    client = grpcclient.InferenceServerClient(encoders[0].grpc_url)
    expected = client.infer("encode_item", item_inputs(grpcclient, item.data, item.metadata.to_json(), None),
                            client_timeout=TIMEOUT_S).as_numpy(TABLE)  # fmt: skip
    rows, hidden = expected.shape[1:]
    dtype = serving_settings(tiny_checkpoint).resolved_dtype
    exact = rows * hidden * torch_dtype(dtype).itemsize
    region.view(0, region.byte_size).fill_(0xAB)
    for offset, size, declared, message in (
        (0, exact + 256, exact, f"nixl_descriptor names {exact + 256} bytes, output_byte_size declares \\[{exact}\\]"),
        (0, exact - 256, exact - 256, f"output_byte_size is {exact - 256}, but the item's embeddings are {exact}"),
    ):  # fmt: skip
        descriptor = agent.descriptor(offset, size).to_array()
        with pytest.raises(InferenceServerException, match=message):
            client.infer(ENCODE_ITEM_NIXL, nixl_inputs(item, agent, descriptor, declared), client_timeout=TIMEOUT_S)
    assert bool((region.view(0, region.byte_size) == 0xAB).all()), "a refused request wrote the region"
    offset = 4096
    result = client.infer(ENCODE_ITEM_NIXL, nixl_inputs(item, agent, agent.descriptor(offset, exact).to_array(),
                                                        exact), client_timeout=TIMEOUT_S)  # fmt: skip
    assert result.as_numpy(TABLE_SHAPE).tolist() == [[1, rows, hidden]]
    assert result.as_numpy(HANDOFF_US)[0, 0] > 0
    assert result.as_numpy(ENCODER_METADATA) is not None and result.as_numpy(TABLE) is None  # no rows sent back
    # the very rows encode_item answers with (tritonclient decodes BF16 as float32: exact, and back)
    expected = torch.from_numpy(np.array(expected, dtype=np.float32)).to(torch_dtype(dtype))
    assert region.view(offset, exact).numpy().tobytes() == expected.view(torch.uint8).numpy().tobytes()
    assert bool((region.view(0, offset) == 0xAB).all()) and bool((region.view(offset + exact, 4096) == 0xAB).all())
    client.close()
