"""The TTFT load benchmark (benchmarks/bench_ttft.py): its request stream and a short run on the suite's server."""

import argparse
import io
import json

import pytest
from PIL import Image

from benchmarks.bench_ttft import STAGES, engine_knob, image_pool, main, percentile, plan, run_rate, run_sequential


def test_the_request_stream_depends_only_on_the_seed():
    first = plan(2.0, 50, (1, 8), 32, seed=7)
    assert first == plan(2.0, 50, (1, 8), 32, seed=7)
    assert first != plan(2.0, 50, (1, 8), 32, seed=8)
    assert all(1 <= len(r.images) <= 8 and len(set(r.images)) == len(r.images) for r in first)
    gaps = [b.at_s - a.at_s for a, b in zip(first, first[1:])]
    assert all(gap >= 0 for gap in gaps) and 0.2 < sum(gaps) / len(gaps) < 1.0  # mean gap 1/rate = 0.5 s


def test_images_are_distinct_jpegs_of_the_size_asked():
    pool = image_pool(4, (96, 64), seed=0)
    assert len(set(pool)) == 4
    assert Image.open(io.BytesIO(pool[0])).size == (96, 64)


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 0.99) == 99 and percentile(values, 0.5) == 50 and percentile([3.0], 0.99) == 3.0


def test_a_short_run_completes_every_request(triton_server):
    pool = image_pool(8, (64, 48), seed=1)
    planned = plan(8.0, 6, (0, 2), len(pool), seed=1)
    result = run_rate(triton_server.grpc_url, 8.0, planned, pool, max_tokens=4, timeout_s=60.0)
    assert result.errors == []
    assert len(result.ttft_s) == 6 and all(t > 0 for t in result.ttft_s)
    assert result.images == sum(len(r.images) for r in planned)
    summary = result.summary()
    assert summary["completed"] == 6 and summary["ttft_p99_ms"] >= summary["ttft_median_ms"] > 0


def test_sequential_rows_split_the_server_time_by_model(triton_server):
    """Each row says where its requests' server time went: every model that ran, its executions and ms per stage."""
    pool = image_pool(4, (64, 48), seed=2)
    (row,) = run_sequential(triton_server.grpc_url, [1], 2, pool, max_tokens=2, timeout_s=60.0,
                            stats_urls=[triton_server.grpc_url])  # fmt: skip
    split = row["server_ms_per_request"]
    assert row["requests"] == 2 and row["ttft_min_ms"] > 0
    assert split["0/mimo_encoder"]["executions"] == 2 and split["0/preprocessing"]["executions"] == 2, split
    assert all(stats[f"{stage}_ms"] >= 0 for stats in split.values() for stage in STAGES)
    assert split["0/mimo_encoder"]["compute_infer_ms"] > 0


def test_the_epd_layout_serves_a_short_run(tmp_path):
    """--launch epd: an encoder server and a language server, every request answered (exit 0), the report says the
    layout (several encoder servers: tests/test_epd_language.py)."""
    out = tmp_path / "report.json"
    assert main(["--launch", "epd", "--encoders", "1", "--rates", "4", "--requests", "3", "--images", "1-2",
                 "--image-size", "64x48", "--max-tokens", "2", "--workdir", str(tmp_path / "run"),
                 "--engine", "max_num_batched_tokens=1536", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["layout"] == "epd (1 encoder server)" and report["rows"][0]["completed"] == 3
    config = (tmp_path / "run" / "language" / "model_repository" / "mimo_llm" / "config.pbtxt").read_text()
    assert 'parameters { key: "max_num_batched_tokens" value { string_value: "1536" } }' in config


def test_engine_knobs_are_checked_by_name_and_value():
    assert engine_knob("max_num_batched_tokens=8192") == ("max_num_batched_tokens", 8192)
    with pytest.raises(argparse.ArgumentTypeError, match="'max_batch' is not an EngineConfig knob"):
        engine_knob("max_batch=8")
    with pytest.raises(argparse.ArgumentTypeError, match="must be an int"):
        engine_knob("max_prefill_chunk=big")
