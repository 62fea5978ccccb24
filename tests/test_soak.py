"""A CI-sized soak on the suite's server: mixed streaming traffic (gRPC and HTTP, text and media) with clients that
vanish in every way and bad requests, then nothing may be held, memory must be flat across the second half, and a
fixed probe request must give the tokens it gave before (benchmarks/soak.py, which also runs the 30-minute soak)."""

from benchmarks.soak import ACTIONS, Endpoints, run_soak

SOAK_SECONDS = 45.0


def test_short_soak_leaks_nothing_and_changes_nothing(triton_server):
    endpoints = Endpoints(triton_server.grpc_url, triton_server.http_url, triton_server.metrics_url,
                          triton_server.process.pid)  # fmt: skip
    report = run_soak(endpoints, SOAK_SECONDS, workers=6, seed=1)
    assert report.failures == [], report.failures
    assert set(report.counts) == set(ACTIONS), report.counts  # every kind of traffic ran
    assert len(report.rss_samples) >= SOAK_SECONDS / 2
