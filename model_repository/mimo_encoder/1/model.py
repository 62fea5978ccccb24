"""mimo_encoder: batched image/video/audio encoding into per-request prompt tables, kept on the encoder's device, or
written by this model into the caller's landing slice when the request names one (mimo.epd.direct_write): then the
response carries the rows' shape and the write's time, no rows. The slice is checked and its region mapped before the
batch is encoded."""

import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from mimo.epd.direct_write import OUTPUT_BYTE_SIZE, LANDING_INPUTS, SliceTarget, SliceWriter
from mimo.epd.handoff import HANDOFF_US, TABLE, TABLE_SHAPE
from mimo.processing.errors import ProcessingError
from mimo.processing.items import PACKED_MEDIA_TENSORS
from mimo.processing.processor import processor_config_from_checkpoint
from mimo.serving.contract import TEST_FAULT_ROWS
from mimo.serving.encode import PromptTableEncoder, encoder_config, faulty_table, load_multimodal_encoder, unpack_request
from mimo.serving.triton_config import exit_stub_process, instance_device, model_parameter, torch_dtype


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        device = instance_device(args)
        dtype = torch_dtype(model_parameter(model_config, "dtype"))
        checkpoint_dir = model_parameter(model_config, "checkpoint_dir")
        encoder = load_multimodal_encoder(checkpoint_dir, dtype, device)
        if device.type == "cuda":
            encoder.warm_up()  # the compiled CUDA paths compile here, not during the first requests
        processor = processor_config_from_checkpoint(checkpoint_dir)
        self.encoder = PromptTableEncoder(encoder, processor, encoder_config(model_config))
        self.writer = SliceWriter()
        # the colocated mimo_encoder has no landing slice and answers the table alone (contract.SLICE_WRITING_ENCODER)
        self.writes = TABLE_SHAPE in {output["name"] for output in model_config["output"]}
        # only the encoder role renders it (0 unless a test sets --test-fault-rows)
        self.fault_rows = (model_parameter(model_config, TEST_FAULT_ROWS, int)
                           if TEST_FAULT_ROWS in model_config.get("parameters", {}) else 0)  # fmt: skip
        if self.fault_rows:
            pb_utils.Logger.log_warn(f"TEST-ONLY FAULT ({TEST_FAULT_ROWS}={self.fault_rows}): every table this "
                                     f"server answers is {self.fault_rows:+d} rows off")  # fmt: skip
        pb_utils.Logger.log_info(f"mimo_encoder on {device} ({dtype})")

    def execute(self, requests):
        responses = [None] * len(requests)
        batch, batch_index, targets = [], [], []
        for index, request in enumerate(requests):
            try:
                arrays = {name: pb_utils.get_input_tensor_by_name(request, name) for name in
                          (*PACKED_MEDIA_TENSORS, OUTPUT_BYTE_SIZE, *LANDING_INPUTS)}  # fmt: skip
                arrays = {name: tensor.as_numpy() for name, tensor in arrays.items() if tensor is not None}
                target = SliceTarget.from_inputs(arrays)
                if target is not None and self.writer.open(target):
                    pb_utils.Logger.log_info(f"mimo_encoder: mapped landing region {target.region} ({target.kind}, "
                                             f"{target.region_byte_size} bytes)")  # fmt: skip
                batch.append(unpack_request({name: arrays[name] for name in PACKED_MEDIA_TENSORS if name in arrays}))
                batch_index.append(index)
                targets.append(target)
            except ProcessingError as error:
                responses[index] = self._error(error)
        for index, target, table in zip(batch_index, targets, self.encoder.encode(batch)):
            if isinstance(table, Exception):
                responses[index] = self._error(table)
                continue
            answered = faulty_table(table, self.fault_rows) if self.fault_rows else table
            if target is None:
                responses[index] = self._table(answered, answered.unsqueeze(0).contiguous(), 0.0)
                continue
            try:
                seconds = self.writer.write(table, target)
            except ProcessingError as error:  # nothing written
                responses[index] = self._error(error)
                continue
            # the test-only fault of a slice request is in the answered shape: what the language side checks
            responses[index] = self._table(answered, table.new_empty(1, 0, table.shape[1], device="cpu"), seconds)
        return responses

    def finalize(self):
        self.writer.close()
        exit_stub_process()  # see there: the stub's own teardown can hang after CUDA work on this thread

    def _table(self, table: torch.Tensor, rows: torch.Tensor, handoff_s: float):
        # DLPack keeps a GPU table on the GPU; Triton carves the output from its CUDA memory pool
        outputs = [pb_utils.Tensor.from_dlpack(TABLE, rows),
                   pb_utils.Tensor("prompt_vocab_size", np.array([[table.shape[0]]], dtype=np.int32))]
        if self.writes:
            outputs += [pb_utils.Tensor(TABLE_SHAPE, np.array([[1, *table.shape]], dtype=np.int64)),
                        pb_utils.Tensor(HANDOFF_US, np.array([[round(handoff_s * 1e6)]], dtype=np.int64))]
        return pb_utils.InferenceResponse(outputs)

    @staticmethod
    def _error(error: Exception):
        # ProcessingError and the towers' input checks are ValueErrors: the request was bad, not the model
        code = pb_utils.TritonError.INVALID_ARG if isinstance(error, ValueError) else pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(error).__name__}: {error}", code))
