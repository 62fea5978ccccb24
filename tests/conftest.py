"""Session fixtures for the serving tests: one tiny checkpoint, one real tritonserver over its rendered repository.

MIMO_SERVING_DEVICE=gpu renders the repository for KIND_GPU (GPU machines); CI uses cpu. Imports happen inside
the fixtures so that collecting the rest of the suite does not depend on the serving stack.
"""

import os

import pytest

SERVING_DEVICE = os.environ.get("MIMO_SERVING_DEVICE", "cpu")
SERVED_MAX_MODEL_LEN = 1024


def serving_settings(checkpoint):
    from builders.repository import RepositorySettings

    return RepositorySettings(checkpoint=checkpoint, device=SERVING_DEVICE, max_batch=16, max_num_seqs=32,
                              max_model_len=SERVED_MAX_MODEL_LEN)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from builders.tiny import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny")


@pytest.fixture(scope="session")
def triton_server(tiny_checkpoint, tmp_path_factory):
    from builders.repository import render_repository
    from mimo.serving.server_process import TritonServer

    root = tmp_path_factory.mktemp("serving")
    command = render_repository(serving_settings(tiny_checkpoint), root / "model_repository")
    server = TritonServer(root / "model_repository", root / "tritonserver.log", extra_args=command[2:]).start()
    yield server
    assert server.is_ready(), server.log_tail()
    assert server.stop() == 0, server.log_tail()
