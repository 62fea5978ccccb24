"""postprocessing: mimo_llm token ids -> text pieces, never splitting a UTF-8 character; keeps no state."""

import json

import triton_python_backend_utils as pb_utils

from mimo.serving.detokenize import IncrementalDetokenizer, detokenized_outputs
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
        arrays = [pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                  for name in ("output_ids", "preceding_ids", "finish_reason")]  # fmt: skip
        try:
            outputs = detokenized_outputs(self.detokenizer, *arrays)
        except ValueError as error:  # ids outside the vocabulary: a direct caller's bad request
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, array) for name, array in outputs.items()])
