"""The main job: checkpoint -> repository -> tritonserver -> image + audio + text request -> server stopped."""

import subprocess
import sys


def test_demo_streams_a_multimodal_reply_and_stops_the_server(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.demo", "--workdir", str(tmp_path), "--max-tokens", "6"],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[6 tokens, finish_reason=length, TTFT" in result.stdout
    assert "tritonserver stopped (exit status 0)" in result.stdout
