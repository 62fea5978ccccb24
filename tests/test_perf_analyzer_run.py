"""benchmarks/perf_analyzer_run.py records a perf_analyzer run that found no stable window (with perf_analyzer's
reason) instead of raising, and reads a successful run's CSV. perf_analyzer itself runs only on the GPU machines:
here a stand-in executable plays its two outcomes (what it prints, its exit status, the CSV it writes)."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from perf_analyzer_run import run_perf_analyzer  # noqa: E402

UNSTABLE = "Failed to obtain stable measurement within 6 measurement windows for concurrency 4. Please try to increase the --measurement-interval."  # noqa: E501
CSV = "Concurrency,Inferences/Second,p50 latency,p90 latency,p99 latency\n4,12.5,80000,90000,99000\n"


def stand_in(tmp_path: Path, body: str) -> str:
    script = tmp_path / "perf_analyzer"
    script.write_text(f"#!{sys.executable}\nimport sys\nargs = sys.argv[1:]\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_a_run_without_a_stable_window_is_recorded_with_the_reason(tmp_path):
    binary = stand_in(tmp_path, f"print('*** Measurement Settings ***')\nprint({UNSTABLE!r})\nsys.exit(1)")
    row = run_perf_analyzer(binary, "localhost:1", tmp_path / "inputs.json", 4, tmp_path / "out.csv")
    assert row["concurrency"] == 4
    assert row["error"] == f"perf_analyzer exited 1: {UNSTABLE}"


def test_a_stale_csv_of_an_earlier_run_is_not_read_as_this_runs(tmp_path):
    (tmp_path / "out.csv").write_text(CSV)
    binary = stand_in(tmp_path, "print('error: failed to connect')\nsys.exit(99)")
    row = run_perf_analyzer(binary, "localhost:1", tmp_path / "inputs.json", 4, tmp_path / "out.csv")
    assert row["error"] == "perf_analyzer exited 99: error: failed to connect"


def test_a_successful_run_is_read_from_its_csv(tmp_path):
    binary = stand_in(tmp_path, f"open(args[args.index('-f') + 1], 'w').write({CSV!r})")
    row = run_perf_analyzer(binary, "localhost:1", tmp_path / "inputs.json", 4, tmp_path / "out.csv")
    assert row == {"concurrency": 4, "inferences_per_s": 12.5, "ttft_p50_ms": 80.0, "ttft_p90_ms": 90.0,
                   "ttft_p99_ms": 99.0}  # fmt: skip
