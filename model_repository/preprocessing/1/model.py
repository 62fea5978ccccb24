"""preprocessing: user text + encoded media -> prompt-table input_ids for mimo_llm and packed inputs for mimo_encoder."""

import json

import triton_python_backend_utils as pb_utils

from mimo.processing.processor import MiMoProcessor
from mimo.serving.preprocess import preprocess_request
from mimo.serving.triton_config import exit_stub_process, model_parameter, processing_response, yes_no_parameter


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        self.processor = MiMoProcessor.from_checkpoint(model_parameter(model_config, "checkpoint_dir"))
        self.max_model_len = model_parameter(model_config, "max_model_len", int)
        self.jpeg_to_encoder = yes_no_parameter(model_config, "jpeg_to_encoder")
        self.input_names = [i["name"] for i in model_config["input"]]

    def finalize(self):
        exit_stub_process()  # see there: the stub's own teardown takes seconds, past the launcher's exit grace

    def execute(self, requests):
        return [processing_response(pb_utils, request, self.input_names, self._preprocess, "preprocessing")
                for request in requests]  # fmt: skip

    def _preprocess(self, inputs):
        return preprocess_request(self.processor, inputs, self.max_model_len, jpeg_to_encoder=self.jpeg_to_encoder)
