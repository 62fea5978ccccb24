"""postprocessing: mimo_llm token ids -> text pieces, never splitting a UTF-8 character; keeps no state."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from mimo.serving.detokenize import IncrementalDetokenizer
from mimo.serving.triton_config import exit_stub_process, model_parameter


class TritonPythonModel:
    def initialize(self, args):
        checkpoint_dir = model_parameter(json.loads(args["model_config"]), "checkpoint_dir")
        self.detokenizer = IncrementalDetokenizer.from_checkpoint(checkpoint_dir)

    def finalize(self):
        exit_stub_process()  # see there: the stub's own teardown takes seconds, past the launcher's exit grace

    def execute(self, requests):
        return [self._detokenize(request) for request in requests]

    def _detokenize(self, request):
        output_ids = pb_utils.get_input_tensor_by_name(request, "output_ids").as_numpy().reshape(-1)
        preceding_ids = pb_utils.get_input_tensor_by_name(request, "preceding_ids").as_numpy().reshape(-1)
        finish_reason = pb_utils.get_input_tensor_by_name(request, "finish_reason").as_numpy().reshape(-1)[0]
        try:
            text = self.detokenizer.text_piece(preceding_ids.tolist(), output_ids.tolist(), final=bool(finish_reason))
        except ValueError as error:  # ids outside the vocabulary: a direct caller's bad request
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=np.object_)),
            pb_utils.Tensor("output_ids", output_ids.reshape(1, -1)),
            pb_utils.Tensor("finish_reason", np.array([[finish_reason]], dtype=np.object_)),
        ])
