"""media_preprocessing (encoder role): one item's raw bytes + planned metadata -> its packed encoder inputs."""

import json

import triton_python_backend_utils as pb_utils

from mimo.epd.item_encoding import ItemPreprocessor
from mimo.serving.triton_config import exit_stub_process, model_parameter, processing_response, yes_no_parameter


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        self.preprocessor = ItemPreprocessor.from_checkpoint(
            model_parameter(model_config, "checkpoint_dir"), model_parameter(model_config, "dtype"),
            jpeg_to_encoder=yes_no_parameter(model_config, "jpeg_to_encoder"))
        self.input_names = [i["name"] for i in model_config["input"]]

    def finalize(self):
        exit_stub_process()  # see there: the stub's own teardown takes seconds, past the launcher's exit grace

    def execute(self, requests):
        return [processing_response(pb_utils, request, self.input_names, self.preprocessor.preprocess,
                                    "media_preprocessing") for request in requests]  # fmt: skip
