"""encode_item_nixl (encoder role, handoff nixl): encode_item through BLS, then a NIXL WRITE of the rows into the
caller's landing slice (`mimo.epd.nixl_transfer`); the response carries the metadata, the rows' shape and the WRITE's
time only (the response of a slice written in handoff shm).

The descriptor and the caller's agent are checked before anything is encoded; a WRITE that times out in flight is
answered with an error ending in nixl_transfer.MAY_STILL_LAND (the caller then keeps the slice quarantined). The
NIXL agent starts at the first request; an instance whose NIXL cannot be imported or started logs why and answers
every request with an error naming the cause (the encoder role serves shm and grpc all the same).
"""

import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from mimo.epd.handoff import (ENCODE_ITEM, HANDOFF_US, NIXL_AGENT, NIXL_AGENT_METADATA, NIXL_DESCRIPTOR, TABLE,
                              TABLE_SHAPE)  # fmt: skip
from mimo.epd.item_encoding import ENCODER_METADATA, ITEM_METADATA, MEDIA_BYTES, OUTPUT_BYTE_SIZE
from mimo.epd.nixl_transfer import Descriptor, NixlUnavailable, RowWriter, TransferError, load_nixl
from mimo.serving.triton_config import exit_stub_process, model_parameter


def item_request(request) -> tuple[str, np.ndarray, Descriptor, int]:
    """(agent name, its metadata, the slice, the declared byte size) of one request, checked (TransferError)."""
    tensors = {name: pb_utils.get_input_tensor_by_name(request, name)
               for name in (NIXL_AGENT, NIXL_AGENT_METADATA, NIXL_DESCRIPTOR, OUTPUT_BYTE_SIZE)}  # fmt: skip
    missing = [name for name, tensor in tensors.items() if tensor is None]
    if missing:
        raise TransferError(f"encode_item_nixl needs {', '.join(missing)}")
    name = tensors[NIXL_AGENT].as_numpy().reshape(-1)
    if name.size != 1 or not isinstance(name[0], bytes):
        raise TransferError(f"{NIXL_AGENT} must hold one name")
    descriptor = Descriptor.from_array(tensors[NIXL_DESCRIPTOR].as_numpy())
    declared = tensors[OUTPUT_BYTE_SIZE].as_numpy().reshape(-1)
    if declared.size != 1 or int(declared[0]) != descriptor.byte_size:
        raise TransferError(f"{NIXL_DESCRIPTOR} names {descriptor.byte_size} bytes, {OUTPUT_BYTE_SIZE} declares "
                            f"{declared.tolist()}")  # fmt: skip
    return name[0].decode(), tensors[NIXL_AGENT_METADATA].as_numpy().reshape(-1), descriptor, int(declared[0])


def error_response(message: str, code=None):
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        self.timeout_s = model_parameter(model_config, "transfer_timeout_ms", int) / 1000
        self.writer = self.unavailable = None
        try:
            load_nixl()
        except NixlUnavailable as error:
            self._refuse(error)

    def _refuse(self, error: NixlUnavailable) -> None:
        self.unavailable = f"this encoder server cannot WRITE with NIXL: {error}"
        pb_utils.Logger.log_error(f"encode_item_nixl: {self.unavailable}")

    def _row_writer(self) -> RowWriter | None:
        """Started by the first request: a NIXL agent's progress thread spins as long as it lives (about 14% of a
        core), which an encoder server nobody asks for a NIXL handoff should not pay."""
        if self.writer is None and self.unavailable is None:
            try:
                self.writer = RowWriter(timeout_s=self.timeout_s)
            except NixlUnavailable as error:
                self._refuse(error)
        return self.writer

    def finalize(self):
        exit_stub_process()  # see there; the agent's memory and connections go with the process

    def execute(self, requests):
        return [self.encode(request) for request in requests]

    def encode(self, request):
        if self._row_writer() is None:
            return error_response(self.unavailable, pb_utils.TritonError.UNAVAILABLE)
        try:
            agent, metadata, descriptor, byte_size = item_request(request)
            self.writer.add_remote(agent, metadata)
        except TransferError as error:
            return error_response(str(error))
        inputs = [pb_utils.get_input_tensor_by_name(request, name) for name in (MEDIA_BYTES, ITEM_METADATA,
                                                                               OUTPUT_BYTE_SIZE)]  # fmt: skip
        response = pb_utils.InferenceRequest(model_name=ENCODE_ITEM, inputs=inputs,
                                             requested_output_names=[TABLE, ENCODER_METADATA]).exec()  # fmt: skip
        if response.has_error():
            return error_response(response.error().message(), response.error().code())
        outputs = {tensor.name(): tensor for tensor in response.output_tensors()}
        rows = torch.from_dlpack(outputs[TABLE].to_dlpack())  # [1, num_tokens, hidden], where mimo_encoder left it
        if rows.is_cuda:  # there: tritonserver's memory, opened here by CUDA IPC, which UCX cannot register
            rows = rows.clone()
        try:
            seconds = self.writer.write(rows, agent, descriptor, byte_size)
        except TransferError as error:
            code = pb_utils.TritonError.UNAVAILABLE if error.in_flight else pb_utils.TritonError.INVALID_ARG
            return error_response(str(error), code)
        return pb_utils.InferenceResponse([
            outputs[ENCODER_METADATA],
            pb_utils.Tensor(TABLE_SHAPE, np.array([list(rows.shape)], dtype=np.int64)),
            pb_utils.Tensor(HANDOFF_US, np.array([[round(seconds * 1e6)]], dtype=np.int64)),
        ])  # fmt: skip
