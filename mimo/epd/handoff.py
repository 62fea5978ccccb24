"""How an encoder server's rows reach the language server's landing slice (`handoff` of the language role).

- `shm` (`ShmHandoff`): same host. Each encode_item request names its slice (`mimo.epd.direct_write.SliceTarget`:
  the region's shared-memory key, or its CUDA IPC handle and device, its size, the slice's offset and size);
  mimo_encoder writes the rows there itself through a mapping of the region it keeps, and answers with the metadata,
  the rows' shape and the write's time. Nothing is registered with the encoder servers.
- `nixl` (`NixlHandoff`): across hosts. The language server's NIXL agent registers the landing region once; each
  encode_item_nixl request carries the agent's name and metadata and the slice's descriptor; the encoder server
  WRITEs the rows into the slice (`mimo.epd.nixl_transfer`), waits for completion and answers as shm does.
- `grpc` (`GrpcHandoff`): anywhere, nothing to install. No shared memory: the rows come back as the response's
  binary output and are copied into the slice.

Every mode checks the response (`check_encoded_item`) before the rows are used; `grpc` also checks the bytes that
came are exactly the slice's. shm and nixl answer only once the write is complete: the response is its completion.
"""

from __future__ import annotations


import numpy as np
import torch

from mimo.epd.direct_write import SliceTarget
from mimo.epd.item_encoding import ENCODER_METADATA, ITEM_METADATA, MEDIA_BYTES, OUTPUT_BYTE_SIZE
from mimo.epd.metadata import MetadataError
from mimo.epd.nixl_transfer import MAY_STILL_LAND, NixlUnavailable

HANDOFF_MODES = ("shm", "nixl", "grpc")
TABLE = "prompt_embedding_table"
ENCODE_ITEM = "encode_item"
ENCODE_ITEM_NIXL = "encode_item_nixl"
NIXL_AGENT = "nixl_agent"  # BYTES [1]: the language server's agent name
NIXL_AGENT_METADATA = "nixl_agent_metadata"  # UINT8 [-1]: its metadata (loaded once per encoder agent)
NIXL_DESCRIPTOR = "nixl_descriptor"  # INT64 [4]: address, byte size, device id, memory kind (0 DRAM, 1 VRAM)
TABLE_SHAPE = "table_shape"  # INT64 [3]: the shape of the rows, [1, num_tokens, hidden]
HANDOFF_US = "handoff_us"  # INT64 [1]: the write into the slice, measured by the writer (0: no slice named)


def _tensor(module, name: str, array: np.ndarray):
    from mimo.serving.contract import triton_type  # the contract imports this module's names

    tensor = module.InferInput(name, list(array.shape), triton_type(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def item_inputs(module, data: bytes, metadata: bytes, byte_size: int | None) -> list:
    """encode_item's inputs for one item (`module`: tritonclient.grpc or tritonclient.grpc.aio); `byte_size`: of its
    landing slice (checked by the encoder before decoding)."""
    arrays = {MEDIA_BYTES: np.array([[data]], dtype=np.object_), ITEM_METADATA: np.array([[metadata]], dtype=np.object_)}
    if byte_size is not None:
        arrays[OUTPUT_BYTE_SIZE] = np.array([[byte_size]], dtype=np.int64)
    return [_tensor(module, name, array) for name, array in arrays.items()]


def slice_inputs(module, data: bytes, metadata: bytes, target: SliceTarget) -> list:
    """encode_item's inputs for one item written by the encoder into `target` (output_byte_size: the slice's)."""
    return item_inputs(module, data, metadata, None) + [_tensor(module, name, array)
                                                        for name, array in target.arrays().items()]  # fmt: skip


class _Written:
    """A response that says the rows were written into the slice: their shape and the write's time, no rows."""

    def rows_shape(self, result) -> list[int]:
        shape = result.as_numpy(TABLE_SHAPE)
        if shape is None or shape.size != 3:
            raise MetadataError(f"the encoder server's response has no {TABLE_SHAPE} of 3 values")
        return [int(v) for v in shape.reshape(-1)]

    def land(self, result, destination: torch.Tensor) -> float | None:
        """After the response was checked: the rows into `destination` (uint8, the item's range of the slice) if
        they are not there yet; returns the write's seconds as the encoder measured it (None: no write)."""
        elapsed = result.as_numpy(HANDOFF_US)
        if elapsed is None or elapsed.size != 1:
            raise MetadataError(f"the encoder server's response has no {HANDOFF_US}")
        return float(elapsed.reshape(-1)[0]) / 1e6

    def may_still_write(self, message: str) -> bool:
        """An error answer after which the encoder server may still write the slice."""
        return False

    def close(self) -> None:
        pass


class ShmHandoff(_Written):
    mode, model = "shm", ENCODE_ITEM

    def __init__(self, region):
        self.region = region

    def request(self, module, data: bytes, metadata: bytes, offset: int, byte_size: int) -> tuple[list, list]:
        inputs = slice_inputs(module, data, metadata, SliceTarget.of(self.region, offset, byte_size))
        return inputs, [module.InferRequestedOutput(name) for name in (ENCODER_METADATA, TABLE_SHAPE, HANDOFF_US)]


class GrpcHandoff(ShmHandoff):
    mode, model = "grpc", ENCODE_ITEM

    def request(self, module, data, metadata, offset, byte_size):
        outputs = [module.InferRequestedOutput(TABLE), module.InferRequestedOutput(ENCODER_METADATA)]
        return item_inputs(module, data, metadata, byte_size), outputs

    def rows_shape(self, result) -> list[int]:
        return list(result.get_output(TABLE).shape)

    def land(self, result, destination):
        response = result.get_response()
        raw = response.raw_output_contents[[output.name for output in response.outputs].index(TABLE)]
        if len(raw) != destination.numel():
            raise MetadataError(f"{TABLE} came as {len(raw)} bytes, the landing slice is {destination.numel()}")
        destination.copy_(torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()))
        return None


class NixlHandoff(_Written):
    mode, model = "nixl", ENCODE_ITEM_NIXL

    def __init__(self, region, agent=None):
        from mimo.epd.nixl_transfer import LandingAgent

        self.landing = LandingAgent(region, agent)
        self._name = np.array([[self.landing.name.encode()]], dtype=np.object_)
        self._metadata = self.landing.metadata_array[np.newaxis]

    def request(self, module, data, metadata, offset, byte_size):
        descriptor = self.landing.descriptor(offset, byte_size).to_array()[np.newaxis]
        inputs = item_inputs(module, data, metadata, byte_size)
        # the metadata goes with every request: each encoder instance has an agent of its own and loads it once
        inputs += [_tensor(module, NIXL_AGENT, self._name), _tensor(module, NIXL_AGENT_METADATA, self._metadata),
                   _tensor(module, NIXL_DESCRIPTOR, descriptor)]  # fmt: skip
        outputs = [module.InferRequestedOutput(name) for name in (ENCODER_METADATA, TABLE_SHAPE, HANDOFF_US)]
        return inputs, outputs

    def may_still_write(self, message):
        return MAY_STILL_LAND in message

    def close(self) -> None:
        self.landing.close()


def make_handoff(mode: str, region):
    """The handoff of `mode` into `region` (the landing pool's: Triton shared memory, registered with this server
    for mimo_llm; `shm` names it to the encoder servers, `nixl` registers it with NIXL as DRAM or VRAM, `grpc` only
    copies into it). Raises ValueError for an unknown mode, NixlUnavailable (naming the cause) when nixl is asked
    for and cannot be used."""
    if mode not in HANDOFF_MODES:
        raise ValueError(f"handoff must be one of {', '.join(HANDOFF_MODES)}; got {mode!r}")
    if mode == "shm":
        return ShmHandoff(region)
    if mode == "grpc":
        return GrpcHandoff(region)
    try:
        return NixlHandoff(region)
    except NixlUnavailable as error:
        raise NixlUnavailable(f"handoff nixl was asked for, but {error} (handoff grpc needs nothing installed)") from None
