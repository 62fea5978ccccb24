"""postprocessing: mimo_llm token ids -> text pieces, never splitting a UTF-8 character; keeps no state."""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

from mimo.serving.detokenize import IncrementalDetokenizer, detokenized_outputs
from mimo.serving.triton_config import model_parameter


class TritonPythonModel:
    def initialize(self, args):
        checkpoint_dir = Path(model_parameter(json.loads(args["model_config"]), "checkpoint_dir"))
        self.detokenizer = IncrementalDetokenizer(Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json")))

    def execute(self, requests):
        return [self._detokenize(request) for request in requests]

    def _detokenize(self, request):
        arrays = [pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                  for name in ("output_ids", "preceding_ids", "finish_reason")]  # fmt: skip
        outputs = detokenized_outputs(self.detokenizer, *arrays)
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, array) for name, array in outputs.items()])
