"""An encoder server (`builders repository --role encoder`, one of the session's pair) as a real tritonserver: one
item's raw bytes and planned metadata in over gRPC, its rows written by mimo_encoder itself into the slice of a
landing pool the request names (system shared memory; with MIMO_SERVING_DEVICE=gpu a CUDA region, by IPC handle),
equal to what the colocated mimo_encoder computes, each region mapped once; wrong-size slices, slices outside their
region, unknown regions and wrong metadata refused, the slice untouched; nothing registered with the server.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from conftest import LLM_GPU, SERVING_DEVICE, serving_settings
from mimo.epd.direct_write import SliceTarget
from mimo.epd.handoff import HANDOFF_US, TABLE, TABLE_SHAPE, slice_inputs
from mimo.epd.item_encoding import ENCODER_METADATA, check_encoded_item
from mimo.epd.landing import LandingPool, landing_region
from mimo.epd.metadata import ItemMetadata, MetadataError
from mimo.epd.orchestrate import encode_inputs
from mimo.epd.plan import PlannedItem, plan_request
from mimo.processing.processor import MiMoProcessor
from mimo.serving.encode import PromptTableEncoder, load_multimodal_encoder
from mimo.serving.triton_config import torch_dtype
from processing_media import encode_audio, encode_image, encode_video, gradient_rgb, tone
from PIL import Image

TIMEOUT_S = 120
IMAGE = encode_image(Image.fromarray(gradient_rgb(100, 70)), "PNG")
OTHER_IMAGE = encode_image(Image.fromarray(gradient_rgb(70, 100)), "PNG")
AUDIO = encode_audio(tone(440.0, 16000, 1.3), 16000, "m4a")
VIDEO = encode_video(2.0, 4)  # with an AAC sound track


@pytest.fixture(scope="module")
def settings(tiny_checkpoint):
    return dataclasses.replace(serving_settings(tiny_checkpoint), role="encoder")


@pytest.fixture(scope="module")
def encoder_server(shared_encoders):
    return shared_encoders[0]  # rendered from `settings`


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return MiMoProcessor.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, settings, processor):
    """The colocated mimo_encoder's computation, in-process, on the served device and dtype."""
    device = "cuda" if SERVING_DEVICE == "gpu" else "cpu"
    dtype = torch_dtype(settings.resolved_dtype)
    return PromptTableEncoder(load_multimodal_encoder(tiny_checkpoint, dtype, torch.device(device)), processor.config)


@pytest.fixture
def pool(encoder_server):
    """A landing pool as the language server's (in mimo_llm's GPU memory on a GPU run), registered nowhere."""
    client = grpcclient.InferenceServerClient(encoder_server.grpc_url)
    region = landing_region(1 << 20, f"cuda:{LLM_GPU}" if SERVING_DEVICE == "gpu" else "cpu", "mimo_test_")
    with LandingPool(region) as pool:
        yield pool
        stats = pool.stats()
        assert (stats.slices_in_use, stats.quarantined_slices) == (0, 0)
    assert region.kind == "cuda" or not region.path.exists()
    assert not client.get_system_shared_memory_status(as_json=True).get("regions")  # nothing registered
    assert not client.get_cuda_shared_memory_status(as_json=True).get("regions")
    client.close()


def planned(processor, kind: str, data: bytes) -> tuple[PlannedItem, object]:
    """The language side's plan of one item, and the item as today's full preprocessing gives it."""
    messages = [{"role": "user", "content": [{"type": kind, kind: data}, {"type": "text", "text": "?"}]}]
    (item,) = plan_request(processor, messages).items
    (decoded,) = processor.process(messages).items
    return item, decoded


def item_inputs(module, item: PlannedItem, byte_size: int | None, metadata: bytes | None = None) -> list:
    return encode_inputs(module, item.data, metadata or item.metadata.to_json(), byte_size)


def written_inputs(module, item: PlannedItem, lease, **changes) -> list:
    """encode_item's inputs naming `lease`'s slice (`changes`: SliceTarget fields made wrong)."""
    target = dataclasses.replace(SliceTarget.of(lease.pool.region, lease.offset, lease.byte_size), **changes)
    return slice_inputs(module, item.data, item.metadata.to_json(), target)


def written_outputs(module) -> list:
    return [module.InferRequestedOutput(name) for name in (ENCODER_METADATA, TABLE_SHAPE, HANDOFF_US)]


def row_geometry(settings, reference) -> tuple[int, torch.dtype]:
    return reference.hidden_size, torch_dtype(settings.resolved_dtype)


def assert_rows_equal(found: torch.Tensor, expected: torch.Tensor) -> None:
    if SERVING_DEVICE == "cpu":
        assert torch.equal(found.cpu(), expected.cpu())  # the same float32 computation in two processes
    else:
        torch.testing.assert_close(found.cpu(), expected.cpu(), rtol=1.6e-2, atol=1e-2)


def test_rows_land_in_the_slice_equal_to_the_colocated_encoder(encoder_server, pool, processor, reference, settings):
    hidden, dtype = row_geometry(settings, reference)
    item, decoded = planned(processor, "image", IMAGE)
    rows = item.metadata.num_tokens
    client = grpcclient.InferenceServerClient(encoder_server.grpc_url)
    with pool.reserve(rows * hidden * dtype.itemsize, timeout_s=TIMEOUT_S) as lease:
        lease.view(torch.uint8, (lease.byte_size,)).fill_(0xFF)  # NaN everywhere until the encoder writes the rows
        pool.region.synchronize()  # a CUDA region: the fill is done before the encoder process writes
        with lease.remote_write():
            result = client.infer("encode_item", written_inputs(grpcclient, item, lease),
                                  outputs=written_outputs(grpcclient), client_timeout=TIMEOUT_S)  # fmt: skip
        shape = result.as_numpy(TABLE_SHAPE).reshape(-1).tolist()  # the rows' shape, as the handoff reads it
        assert shape == [1, rows, hidden]
        assert result.as_numpy(HANDOFF_US)[0, 0] >= 0
        assert result.get_output(TABLE) is None  # written into the slice, not sent back
        found = ItemMetadata.from_tensor(result.as_numpy(ENCODER_METADATA), processor.config)
        assert found == item.metadata
        check_encoded_item(item.metadata, result.as_numpy(ENCODER_METADATA), shape, processor.config, hidden,
                           encoder_server.grpc_url)  # what the language side checks before using the rows
        forged = dataclasses.replace(found, content_hash="sha256:" + "0" * 64).to_tensor()
        with pytest.raises(MetadataError, match=f"encoder_metadata.content_hash: {encoder_server.grpc_url} found "
                                                "sha256:0000"):  # fmt: skip
            check_encoded_item(item.metadata, forged, shape, processor.config, hidden, encoder_server.grpc_url)
        with pytest.raises(MetadataError, match=f"{encoder_server.grpc_url}: encoder_metadata.num_tokens is 7"):
            check_encoded_item(item.metadata, dataclasses.replace(found, num_tokens=7).to_tensor(), shape,
                               processor.config, hidden, encoder_server.grpc_url)  # fmt: skip
        with pytest.raises(MetadataError, match=r"prompt_embedding_table from .* is \[1, 5, 64\], the plan needs "):
            check_encoded_item(item.metadata, result.as_numpy(ENCODER_METADATA), [1, 5, hidden], processor.config,
                               hidden, encoder_server.grpc_url)  # fmt: skip
        (expected,) = reference.encode([[decoded]])
        assert expected.shape == (rows, hidden)
        assert_rows_equal(lease.view(dtype, (rows, hidden)).clone(), expected)
    client.close()


def test_items_of_one_request_land_side_by_side_from_asyncio(encoder_server, pool, processor, reference, settings):
    """The way the language server calls: tritonclient's asyncio gRPC, one item per request, all at once."""
    hidden, dtype = row_geometry(settings, reference)
    items = [planned(processor, kind, data) for kind, data in (("image", IMAGE), ("audio", AUDIO), ("video", VIDEO))]

    async def encode(client, item: PlannedItem):
        lease = await pool.reserve_async(item.metadata.num_tokens * hidden * dtype.itemsize, timeout_s=TIMEOUT_S)
        with lease.remote_write():
            await client.infer("encode_item", written_inputs(grpcaio, item, lease),
                               outputs=written_outputs(grpcaio), client_timeout=TIMEOUT_S)  # fmt: skip
        return lease

    async def main():
        async with grpcaio.InferenceServerClient(encoder_server.grpc_url) as client:
            return await asyncio.gather(*(encode(client, item) for item, _ in items))

    leases = asyncio.run(main())
    try:
        for before, after in zip(leases, leases[1:]):  # reserved in order, first fit: side by side, disjoint
            assert after.offset == before.offset + before.reserved
        for lease, (item, decoded) in zip(leases, items):
            (expected,) = reference.encode([[decoded]])
            assert_rows_equal(lease.view(dtype, (item.metadata.num_tokens, hidden)).clone(), expected)
    finally:
        for lease in leases:
            lease.release()


def test_a_wrong_size_slice_is_refused_and_left_untouched(encoder_server, pool, processor, reference, settings):
    hidden, dtype = row_geometry(settings, reference)
    item, _ = planned(processor, "image", IMAGE)
    row_bytes = hidden * dtype.itemsize
    exact = item.metadata.num_tokens * row_bytes
    region = pool.region
    unknown = ({"cuda_handle": bytes(64)}, "opening landing_cuda_handle of region .* failed") if region.kind == "cuda" \
        else ({"region": "/mimo_test_landing_none"}, "landing_region '/mimo_test_landing_none': no such shared-memory")
    client = grpcclient.InferenceServerClient(encoder_server.grpc_url)
    for byte_size, changes, message in (
        (exact + row_bytes, {}, f"output_byte_size is {exact + row_bytes}, but the item's embeddings are {exact} "
                                f"bytes \\(item_metadata.num_tokens 6 x hidden_size {hidden}"),
        (exact - row_bytes, {}, f"output_byte_size is {exact - row_bytes}, but the item's embeddings are {exact} "
                                "bytes"),
        (exact, {"offset": region.byte_size - exact + 256}, f"landing_offset {region.byte_size - exact + 256} \\+ "
                                                            f"output_byte_size {exact} is outside the "
                                                            f"{region.byte_size}-byte region"),
        (exact, {"region_byte_size": 2 * region.byte_size}, f"landing_region_byte_size is {2 * region.byte_size}, "
                                                            f"but .* is {region.byte_size} bytes"),
        (exact, *unknown),
    ):  # fmt: skip
        with pool.reserve(byte_size, timeout_s=TIMEOUT_S) as lease:
            lease.view(torch.uint8, (byte_size,)).fill_(0xAB)
            pool.region.synchronize()
            with lease.remote_write(), pytest.raises(InferenceServerException, match=message):
                try:
                    client.infer("encode_item", written_inputs(grpcclient, item, lease, **changes),
                                 outputs=written_outputs(grpcclient), client_timeout=TIMEOUT_S)  # fmt: skip
                finally:
                    lease.settle()  # the server answered: nothing writes the slice any more
            assert bool((lease.view(torch.uint8, (byte_size,)) == 0xAB).all()), "a refused request wrote the slice"
    client.close()


def test_each_landing_region_is_mapped_once(encoder_server, pool, processor, settings, reference):
    """The encoder maps a region at its first slice and keeps the mapping: one log line per region (one instance)."""
    hidden, dtype = row_geometry(settings, reference)
    item, _ = planned(processor, "image", IMAGE)
    byte_size = item.metadata.num_tokens * hidden * dtype.itemsize
    client = grpcclient.InferenceServerClient(encoder_server.grpc_url)
    for _ in range(3):
        with pool.reserve(byte_size, timeout_s=TIMEOUT_S) as lease, lease.remote_write():
            client.infer("encode_item", written_inputs(grpcclient, item, lease), outputs=written_outputs(grpcclient),
                         client_timeout=TIMEOUT_S)  # fmt: skip
    client.close()
    instances = settings.encoder_instances * (len(settings.encoder_gpus) if SERVING_DEVICE == "gpu" else 1)
    opened = encoder_server.log().count(f"mapped landing region {SliceTarget.of(pool.region, 0, 1).region} ")
    assert 1 <= opened <= instances, opened  # exactly 1 with one instance


def test_metadata_that_the_bytes_do_not_give_is_refused_naming_the_field(encoder_server, pool, processor):
    item, _ = planned(processor, "image", IMAGE)
    other, _ = planned(processor, "image", OTHER_IMAGE)  # 70x100: the same rows, the grid transposed
    document = item.metadata.to_json()
    client = grpcclient.InferenceServerClient(encoder_server.grpc_url)
    for data, metadata, message in (
        (item, document.replace(b'"version":1', b'"version":7'), "item_metadata.version is 7; this server speaks "
                                                                  "protocol version 1"),
        (item, document.replace(b',"num_tokens":6', b""), "item_metadata: missing field 'num_tokens'"),
        (other, document, "item_metadata.content_hash is sha256:.* but media_bytes with this encoder server's "
                          "processor settings hash to"),
        (item, dataclasses.replace(item.metadata, grid_thw=(1, 6, 4)).to_json(),
         r"item_metadata.grid_thw: decoding the item found \[1, 4, 6\], the metadata says \[1, 6, 4\]"),
    ):  # fmt: skip
        with pytest.raises(InferenceServerException, match=message):
            client.infer("encode_item", item_inputs(grpcclient, data, None, metadata), client_timeout=TIMEOUT_S)
    # the server is unharmed: the plan as sent encodes
    result = client.infer("encode_item", item_inputs(grpcclient, item, None), client_timeout=TIMEOUT_S)
    assert result.as_numpy("prompt_embedding_table").shape[1] == item.metadata.num_tokens
    client.close()
