"""The perf_analyzer input file holds requests the served ensemble accepts."""

import base64
import importlib.util
import json
from pathlib import Path

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor

from client import MiMoClient

_spec = importlib.util.spec_from_file_location(
    "perf_analyzer_inputs", Path(__file__).resolve().parents[1] / "benchmarks" / "perf_analyzer_inputs.py"
)
perf_analyzer_inputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(perf_analyzer_inputs)


def test_input_file_entries_are_served(triton_server, tmp_path):
    out = tmp_path / "inputs.json"
    assert perf_analyzer_inputs.main(["--out", str(out), "--requests", "2", "--max-tokens", "3"]) == 0
    entries = json.loads(out.read_text())["data"]
    assert len(entries) == 2
    with MiMoClient(triton_server.grpc_url) as client:
        for entry in entries:
            (image,) = deserialize_bytes_tensor(base64.b64decode(entry["image_bytes_input"]["b64"]))
            assert entry["image_bytes_input"]["shape"] == [1] and image.startswith(b"\x89PNG")
            summary = list(client.generate(
                entry["text_input"]["content"][0], images=[image], max_tokens=entry["max_tokens"]["content"][0],
                temperature=entry["temperature"]["content"][0], stream=entry["stream"]["content"][0],
            ))[-1]  # fmt: skip
            assert len(summary.token_ids) == 3
    assert np.unique([e["text_input"]["content"][0] for e in entries]).size == 2
