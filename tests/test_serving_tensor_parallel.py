"""Serving a deployment artifact: the rendered repository (placement, parameters, CUDA pools) and the real
tritonserver running mimo_llm as rank 0 of a TP 2 deployment on CPU (rank 1 a gloo worker it starts), with and
without MTP speculative decoding."""

import re
from pathlib import Path

import pytest
import torch
from conftest import SERVING_DEVICE
from golden import check_or_record, golden
from triton_harness import TritonServer, descendants

from builders.convert import convert
from builders.repository import RepositorySettings, cuda_memory_pool_bytes, render_repository
from client import GenerationSummary, MiMoClient
from client.sample_media import sample_image
from mimo.serving.offline import OfflinePipeline

QUESTION = "What do you see?"


@pytest.fixture(scope="module")
def deploy_tp2(tiny_checkpoint, tmp_path_factory):
    return convert(tiny_checkpoint, tmp_path_factory.mktemp("deploy") / "tp2", tp=2, progress=False)


def rendered(root, name):
    return (root / name / "config.pbtxt").read_text()


def test_gpu_placement_of_the_ranks(deploy_tp2, tmp_path):
    settings = RepositorySettings.for_deploy(deploy_tp2, device="gpu", encoder_gpus=(0, 1), encoder_instances=2,
                                             llm_gpus=(2, 3), max_batch=4, max_media_tokens=1000)  # fmt: skip
    command = render_repository(settings, tmp_path / "repo")
    pool = cuda_memory_pool_bytes(settings, 64)
    # prompt tables live on the encoder GPUs and on rank 0's GPU; rank 1 (GPU 3) never sees one
    assert [a for a in command if a.startswith("--cuda-memory-pool")] == [
        f"--cuda-memory-pool-byte-size={gpu}:{pool}" for gpu in (0, 1, 2)]  # fmt: skip
    encoder, llm = rendered(tmp_path / "repo", "mimo_encoder"), rendered(tmp_path / "repo", "mimo_llm")
    assert "{ count: 2 kind: KIND_GPU gpus: [ 0, 1 ] }" in encoder
    assert str((deploy_tp2 / "encoder").resolve()) in encoder
    assert "{ count: 1 kind: KIND_GPU gpus: [ 2 ] }" in llm
    assert f'key: "deploy_dir" value {{ string_value: "{deploy_tp2.resolve()}" }}' in llm
    assert 'key: "rank_gpus" value { string_value: "2,3" }' in llm
    assert 'key: "checkpoint_dir" value { string_value: "" }' in llm


def test_ranks_need_one_gpu_each(deploy_tp2):
    for llm_gpus in ((1,), (1, 1)):
        with pytest.raises(ValueError, match=r"llm_gpus must name 2 distinct GPUs, one per rank"):
            RepositorySettings.for_deploy(deploy_tp2, device="gpu", llm_gpus=llm_gpus)


@pytest.mark.parametrize("k", [0, 2], ids=["plain", "mtp"])
def test_tp2_deployment_serves_what_one_process_generates(deploy_tp2, tiny_checkpoint, tmp_path, k):
    gpu = SERVING_DEVICE == "gpu"  # GPU machines: rank r on cuda:r, NCCL
    placement = {"device": "gpu", "dtype": "float32", "llm_gpus": (0, 1)} if gpu else {}
    engine = {"max_num_seqs": 4, "max_model_len": 512, "num_speculative_tokens": k}
    settings = RepositorySettings.for_deploy(deploy_tp2, max_batch=4, engine=engine, **placement)
    command = render_repository(settings, tmp_path / "repo")
    image = sample_image((200, 40, 40))
    # bf16 checkpoint, bf16 artifact: the offline pipeline on the source holds the same float32 weights
    offline = OfflinePipeline(tiny_checkpoint, torch.float32, "cuda" if gpu else "cpu")
    expected = offline.generate(QUESTION, images=[image], max_tokens=10)
    server = TritonServer(tmp_path / "repo", tmp_path / "tritonserver.log", extra_args=command[2:]).start()
    try:
        assert len(spawned_processes(server.process.pid)) == 1  # rank 1, started by mimo_llm's instance
        with MiMoClient(server.grpc_url, "grpc") as client:
            *_, summary = client.generate(QUESTION, images=[image], max_tokens=10, temperature=0.0)
        assert isinstance(summary, GenerationSummary) and summary.token_ids == expected
        if not gpu and k == 0:
            check_or_record("tp2_image", summary.token_ids)
        elif not gpu:
            assert summary.token_ids == golden()["tp2_image"]
        if k:  # published after each step: the verifies before the last one are in
            assert float(re.search(r"^mimo_spec_draft_tokens (\S+)$", server.metrics(), re.MULTILINE)[1]) > 0
    finally:
        assert server.stop() == 0, server.log_tail()


def spawned_processes(pid: int) -> list[int]:
    """Descendants of `pid` started by multiprocessing's spawn."""
    found = []
    for child in descendants(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:  # exited meanwhile
            continue
    return found
