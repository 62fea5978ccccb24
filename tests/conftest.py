"""Session fixtures for the serving tests: one tiny checkpoint, one real tritonserver over its rendered repository.

MIMO_SERVING_DEVICE=gpu renders the repository for KIND_GPU (GPU machines); CI uses cpu. On a machine with several
GPUs, MIMO_SERVING_ENCODER_GPUS=1 and MIMO_SERVING_LLM_GPU=0 put the encoder and the LLM on different GPUs (the
disaggregated layout: prompt tables cross GPU to GPU). Imports happen inside the fixtures so that collecting the
rest of the suite does not depend on the serving stack.
"""

import contextlib
import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (the fused MoE) run under its interpreter on the CPU; read when a kernel is decorated, so it
    # is set before any test module imports mimo.models.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SERVING_DEVICE = os.environ.get("MIMO_SERVING_DEVICE", "cpu")
ENCODER_GPUS = tuple(int(g) for g in os.environ.get("MIMO_SERVING_ENCODER_GPUS", "0").split(","))
LLM_GPU = int(os.environ.get("MIMO_SERVING_LLM_GPU", "0"))
SERVED_MAX_MODEL_LEN = 1024


# On a GPU (bf16) a row of a vision-tower forward depends on the other items in it (cuBLAS picks its GEMM kernels by
# the row count), and the EPD tests compare layouts that group a request's items differently (spread over encoder
# servers) token for token: there each item gets a forward of its own. On the CPU (float32) grouping changes nothing.
ENCODER_KNOBS = {"max_encoder_batch_patches": 1} if SERVING_DEVICE == "gpu" else {}


def serving_settings(checkpoint, **engine):
    from builders.repository import RepositorySettings

    return RepositorySettings(checkpoint=checkpoint, device=SERVING_DEVICE, max_batch=16, encoder_gpus=ENCODER_GPUS,
                              llm_gpus=(LLM_GPU,), engine={"max_num_seqs": 32, "max_model_len": SERVED_MAX_MODEL_LEN,
                                                           "warm_up": 1, **engine},  # the GPU default, on the CPU too
                              encoder=ENCODER_KNOBS)  # fmt: skip


@contextlib.contextmanager
def running_server(settings, root):
    """A real tritonserver over the repository rendered for `settings` under `root`; stopped cleanly at the end."""
    from builders.repository import render_repository
    from tools.server_process import TritonServer

    command = render_repository(settings, root / "model_repository")
    server = TritonServer(root / "model_repository", root / "tritonserver.log", extra_args=command[2:]).start()
    yield server
    assert server.is_ready(), server.log_tail()
    assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="module")
def single_torch_thread():
    """The tiny models' ops are microseconds of work: intra-op threads only add synchronisation (10x on 2 cores).
    A module takes it with `pytestmark = pytest.mark.usefixtures("single_torch_thread")`."""
    import torch

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture
def preemptions(monkeypatch) -> list[str]:
    """The ids of the sequences the engine's scheduler preempts during the test, in order."""
    from mimo.engine.scheduler import Scheduler

    preempted = []
    preempt = Scheduler._preempt

    def counting_preempt(self, seq):
        preempted.append(seq.request_id)
        preempt(self, seq)

    monkeypatch.setattr(Scheduler, "_preempt", counting_preempt)
    return preempted


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from builders.tiny import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny")


@pytest.fixture(scope="session")
def triton_server(tiny_checkpoint, tmp_path_factory):
    # two entry instances: every test on this server runs over requests Triton spreads across two entry processes
    settings = dataclasses.replace(serving_settings(tiny_checkpoint), entry_instances=2)
    with running_server(settings, tmp_path_factory.mktemp("serving")) as server:
        yield server


@contextlib.contextmanager
def ucx_environment():
    """UCX's TCP transport only (NIXL peers and servers started meanwhile inherit it; a UCX context reads it when an
    agent starts); with a GPU, cuda_ipc and cuda_copy too. MIMO_TEST_UCX_TLS overrides."""
    saved = os.environ.get("UCX_TLS")
    os.environ["UCX_TLS"] = os.environ.get("MIMO_TEST_UCX_TLS",
                                           "tcp,cuda_ipc,cuda_copy" if torch.cuda.is_available() else "tcp")
    try:
        yield
    finally:
        if saved is None:
            del os.environ["UCX_TLS"]
        else:
            os.environ["UCX_TLS"] = saved


@pytest.fixture(scope="module")
def ucx_tcp():
    with ucx_environment():
        yield


@pytest.fixture(scope="session")
def _encoder_pair(tiny_checkpoint, tmp_path_factory):
    from functools import partial

    from epd_layout import in_parallel, start_server, stop_servers

    settings = serving_settings(tiny_checkpoint)
    root = tmp_path_factory.mktemp("shared_encoders")
    with ucx_environment():  # the NIXL handoff's encoder servers too
        servers = in_parallel(*(partial(start_server, settings, root / f"encoder{i}", role="encoder")
                                for i in range(2)))  # fmt: skip
    yield servers  # a killed one is replaced in place when the next module takes the pair
    stop_servers(servers)


@pytest.fixture(scope="module")
def shared_encoders(_encoder_pair, request):
    """The session's two encoder servers (`--role encoder`, default settings; tests/epd_layout.py), alive, ready
    and with no shared-memory region registered when a module takes them. A test may kill one (the next module
    gets it started again on its ports) or stop and resume it; anything else it changes, it puts back. Stopped
    after the last module that takes them."""
    from epd_layout import restore, stop_servers

    with ucx_environment():
        restore(_encoder_pair)
    yield _encoder_pair
    if request.module.__name__ == request.config.stash[_LAST_PAIR_MODULE]:
        stop_servers(_encoder_pair)


_LAST_PAIR_MODULE = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)  # after pytest's own ordering by fixture parameters, which this keeps
def pytest_collection_modifyitems(config, items):
    """The modules that take `shared_encoders` run one after another, from where the first of them is, so the pair
    is up only while they run: once a NIXL handoff used them, each encode_item_nixl instance's NIXL progress thread
    spins even idle (~15% of a core; two instances per encoder server)."""
    users = [item for item in items if "shared_encoders" in getattr(item, "fixturenames", ())]
    if not users:
        return
    modules = {item.module.__name__ for item in users}
    first = next(i for i, item in enumerate(items) if item.module.__name__ in modules)
    block = [item for item in items if item.module.__name__ in modules]
    rest = [item for item in items if item.module.__name__ not in modules]
    items[:] = rest[:first] + block + rest[first:]
    config.stash[_LAST_PAIR_MODULE] = block[-1].module.__name__
