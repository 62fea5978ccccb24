"""benchmarks/bench_first_request on the CPU: each configuration's child process reports every request's time to
first token and token gaps, and the warm-up's seconds where it ran."""

from benchmarks.bench_first_request import REQUESTS, main


def test_each_child_reports_every_request_with_and_without_the_warm_up():
    rows = main(["--device", "cpu", "--preset", "tiny", "--layers", "2", "--prompt-len", "40", "--decode-len", "8",
                 "--max-num-batched-tokens", "64", "--kv-gib", "1", "--repeats", "1", "--warm-ups", "1,0"])
    assert [row["warm_up"] for row in rows] == [1, 0]
    assert rows[0]["warm_up_s"] > 0 and rows[1]["warm_up_s"] is None
    for row in rows:
        for request_id, _, _ in REQUESTS:
            timing = row[request_id]
            assert timing["ttft_ms"] > 0 and timing["max_gap_ms"] >= timing["median_gap_ms"] > 0
