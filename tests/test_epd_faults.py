"""Encoder servers that answer wrong, and the language server's local fallback encoder, as real tritonserver
processes on loopback: an encoder server rendered with the test-only fault `--test-fault-rows -1` answers every item
one row short. Beside a good server, its answers are rejected (retried on the good one, named in the log) and the
requests get the colocated ensemble's tokens; alone, it fails the request naming the wrong shape, and mimo_llm never
runs. A language server with `--local-encoder` encodes what the encoder servers failed, or everything once they are
all dead (counted as fallbacks); without it, that request fails naming the cause."""

from __future__ import annotations

import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from client import GenerationError
from conftest import serving_settings
from epd_layout import (QUESTION, assert_no_slice_in_use, colocated_tokens, encoded_items, metric, start_server,
                        stop_servers, tokens)  # fmt: skip
from test_epd_language import IMAGES, TONE
from triton_harness import server_binary_pid

FAULT_ROWS = -1


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    """good and faulty encoder servers; `plain` (no fallback) and `local` (--local-encoder) language servers, each
    with its own watched file of encoder servers (both listed at first)."""
    settings = serving_settings(tiny_checkpoint)
    root = tmp_path_factory.mktemp("epd_faults")
    with ThreadPoolExecutor(2) as pool:
        good, faulty = pool.map(lambda name, fault: start_server(settings, root / name, role="encoder",
                                                                 test_fault_rows=fault),
                                ("good", "faulty"), (0, FAULT_ROWS))  # fmt: skip
    files = {name: root / f"{name}_encoders.txt" for name in ("plain", "local")}
    for path in files.values():
        path.write_text(f"{good.grpc_url}\n{faulty.grpc_url}\n")
    with ThreadPoolExecutor(2) as pool:
        plain, local = pool.map(lambda name: start_server(settings, root / name, role="language",
                                                          encoder_urls_file=str(files[name]),
                                                          local_encoder=name == "local", encoder_timeout_ms=10000),
                                ("plain", "local"))  # fmt: skip
    yield {"good": good, "faulty": faulty, "plain": plain, "local": local, "files": files}
    stop_servers([plain, local, good, faulty])


def llm_requests(server) -> float:
    return sum(float(v) for v in re.findall(r'^nv_inference_request_(?:success|failure)\{model="mimo_llm".*\} (\S+)$',
                                            server.metrics(), re.M))  # fmt: skip


def test_the_fault_is_test_only_and_off_by_default(tiny_checkpoint, tmp_path):
    from builders.repository import RepositorySettings, render_repository

    for role in ("colocated", "language"):
        with pytest.raises(ValueError, match=f"--test-fault-rows is for --role encoder, not {role}"):
            RepositorySettings(checkpoint=tiny_checkpoint, role=role, encoder_urls="a:1", test_fault_rows=-1)
    render_repository(RepositorySettings(checkpoint=tiny_checkpoint, role="encoder"), tmp_path / "encoder")
    config = (tmp_path / "encoder" / "mimo_encoder" / "config.pbtxt").read_text()
    assert 'key: "test_fault_rows" value { string_value: "0" }' in config
    render_repository(RepositorySettings(checkpoint=tiny_checkpoint), tmp_path / "colocated")
    assert "test_fault_rows" not in (tmp_path / "colocated" / "mimo_encoder" / "config.pbtxt").read_text()


def test_the_faulty_table_is_off_by_the_rows_asked():
    import torch

    from mimo.serving.encode import faulty_table

    table = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(faulty_table(table, -1), table[:3])
    assert faulty_table(table, -9).shape == (0, 3)
    longer = faulty_table(table, 2)
    assert longer.shape == (6, 3) and torch.equal(longer[:4], table) and not longer[4:].any()


def test_a_faulty_servers_answers_are_rejected_and_retried_on_the_good_one(servers, triton_server):
    good, faulty, plain = servers["good"], servers["faulty"], servers["plain"]
    assert "TEST-ONLY FAULT (test_fault_rows=-1)" in faulty.log()
    kwargs = {"images": IMAGES, "audios": [TONE], "max_tokens": 4, "temperature": 0.0}
    expected = colocated_tokens(triton_server, **kwargs)
    retries, answered = metric(plain, "mimo_epd_retries_total"), encoded_items(faulty)
    for _ in range(8):  # 4 items over the two servers: the faulty one takes some unless it is still marked down
        assert tokens(plain, **kwargs) == expected
        if encoded_items(faulty) > answered:
            break
    assert encoded_items(faulty) > answered, "the faulty server was never asked"
    assert metric(plain, "mimo_epd_retries_total") > retries
    assert re.search(rf"prompt_embedding_table from {faulty.grpc_url} is \[1, \d+, 64\], the plan needs \[1, \d+, "
                     r"64\]", plain.log()), plain.log_tail()  # fmt: skip
    assert encoded_items(good) > 0
    assert_no_slice_in_use(plain)


def test_only_faulty_servers_fail_the_request_naming_the_wrong_shape(servers):
    """Nothing is generated from the wrong-sized rows: mimo_llm gets no request."""
    faulty, plain, files = servers["faulty"], servers["plain"], servers["files"]
    files["plain"].write_text(f"{faulty.grpc_url}\n")
    try:
        before = llm_requests(plain)
        with pytest.raises(GenerationError) as error:
            tokens(plain, images=IMAGES[:1], max_tokens=4, temperature=0.0)
        message = str(error.value)
        assert "encoding the request's media failed" in message and re.search(
            rf"prompt_embedding_table from {faulty.grpc_url} is \[1, (\d+), 64\], the plan needs \[1, (\d+), 64\]",
            message), message  # fmt: skip
        found, planned = map(int, re.search(r"is \[1, (\d+), 64\], the plan needs \[1, (\d+), 64\]", message).groups())
        assert found == planned + FAULT_ROWS
        assert llm_requests(plain) == before
        assert_no_slice_in_use(plain)
        assert tokens(plain, max_tokens=2, temperature=0.0)  # text needs no encoder
    finally:
        files["plain"].write_text(f"{servers['good'].grpc_url}\n{faulty.grpc_url}\n")


def test_the_local_encoder_encodes_what_the_encoder_servers_fail(servers, triton_server):
    faulty, local, files = servers["faulty"], servers["local"], servers["files"]
    kwargs = {"images": IMAGES[:2], "audios": [TONE], "max_tokens": 4, "temperature": 0.0}
    expected = colocated_tokens(triton_server, **kwargs)
    files["local"].write_text(f"{faulty.grpc_url}\n")
    fallbacks = metric(local, "mimo_epd_fallbacks_total")
    assert tokens(local, **kwargs) == expected
    assert metric(local, "mimo_epd_fallbacks_total") - fallbacks == 3
    (line,) = [line for line in local.log().splitlines() if "mimo_epd items:" in line][-1:]
    assert line.count("<- local:") == 3, line
    assert_no_slice_in_use(local)


def test_with_every_encoder_server_dead_only_the_local_encoder_serves(servers, triton_server):
    """Last in this module: both encoder servers are killed."""
    good, faulty, plain, local, files = (servers[k] for k in ("good", "faulty", "plain", "local", "files"))
    files["local"].write_text(f"{good.grpc_url}\n{faulty.grpc_url}\n")
    for server in (good, faulty):
        os.kill(server_binary_pid(server), signal.SIGKILL)
        server.process.wait(60)
    kwargs = {"images": IMAGES[1:], "audios": [TONE], "max_tokens": 4, "temperature": 0.0}
    expected = colocated_tokens(triton_server, **kwargs)
    fallbacks = metric(local, "mimo_epd_fallbacks_total")
    assert tokens(local, **kwargs) == expected
    assert metric(local, "mimo_epd_fallbacks_total") - fallbacks == 3
    with pytest.raises(GenerationError, match="encoding the request's media failed: item image .*no encoder server "
                                               f"left to try \\(configured: .*{good.grpc_url}"):
        tokens(plain, **kwargs)
    for server in (plain, local):
        assert tokens(server, QUESTION, max_tokens=2, temperature=0.0)
        assert_no_slice_in_use(server)
