"""media_preprocessing (encoder role): one item's raw bytes + planned metadata -> its packed encoder inputs."""

import json
import traceback

import triton_python_backend_utils as pb_utils

from mimo.epd.item_encoding import ItemPreprocessor
from mimo.processing.errors import ProcessingError
from mimo.serving.triton_config import exit_stub_process, model_parameter


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        self.preprocessor = ItemPreprocessor.from_checkpoint(model_parameter(model_config, "checkpoint_dir"),
                                                             model_parameter(model_config, "dtype"))  # fmt: skip
        self.input_names = [i["name"] for i in model_config["input"]]

    def finalize(self):
        exit_stub_process()  # see there: the stub's own teardown takes seconds, past the launcher's exit grace

    def execute(self, requests):
        return [self._preprocess(request) for request in requests]

    def _preprocess(self, request):
        inputs = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        try:
            outputs = self.preprocessor.preprocess(inputs)
        except ProcessingError as error:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
        except Exception as error:  # noqa: BLE001 - fail this request only
            pb_utils.Logger.log_error(f"media_preprocessing failed: {traceback.format_exc()}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"media_preprocessing failed: {error}"))
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, array) for name, array in outputs.items()])
