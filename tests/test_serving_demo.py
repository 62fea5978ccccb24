"""The main job: checkpoint -> repository -> tritonserver -> image + audio + text request -> server stopped."""

import subprocess
import sys


def test_demo_streams_a_multimodal_reply_and_stops_the_server(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.demo", "--workdir", str(tmp_path), "--max-tokens", "6"],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[6 tokens, finish_reason=length, TTFT" in result.stdout
    assert "tritonserver stopped (exit status 0)" in result.stdout


def test_the_demo_runs_its_request_through_two_encoder_servers_and_a_language_server(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.demo", "--workdir", str(tmp_path), "--max-tokens", "6",
                             "--epd"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[6 tokens, finish_reason=length, TTFT" in result.stdout
    assert "tritonserver stopped (exit status 0, 0, 0)" in result.stdout
    lines = result.stdout.split("encoded by:\n", 1)[1].splitlines()[:2]
    assert lines[0].startswith("  item 0 image ") and lines[1].startswith("  item 1 audio "), result.stdout
    # both items at once: each to the encoder server with the fewer outstanding tokens, so one each
    assert {line.split(": encoder server ", 1)[1][0] for line in lines} == {"0", "1"}, result.stdout
