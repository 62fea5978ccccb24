"""The golden-token record (`golden_tokens.json`) shared by the tests that check served tokens against it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import SERVING_DEVICE

GOLDEN_FILE = Path(__file__).with_name("golden_tokens.json")
RECORD = os.environ.get("MIMO_RECORD_GOLDEN") == "1"


def golden() -> dict[str, list[int]]:
    return json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {}


def check_or_record(name: str, token_ids: list[int]) -> None:
    """Assert `token_ids` equal the recorded ones (or record them when MIMO_RECORD_GOLDEN=1, on CPU only)."""
    if RECORD:
        assert SERVING_DEVICE == "cpu", "golden tokens are recorded on CPU"
        records = golden()
        records[name] = token_ids
        lines = [f"  {json.dumps(key)}: {json.dumps(records[key])}" for key in sorted(records)]
        GOLDEN_FILE.write_text("{\n" + ",\n".join(lines) + "\n}\n")
        return
    records = golden()
    assert name in records, f"no golden tokens recorded for {name!r} in {GOLDEN_FILE.name}"
    assert token_ids == records[name], f"{name}: served tokens changed"
