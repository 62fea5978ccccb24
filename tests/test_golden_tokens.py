"""Golden tokens: a fixed set of requests through the real server must keep producing the tokens recorded in
`golden_tokens.json` (recorded before the restructure; any refactoring has to keep them bit for bit).

Record anew only on purpose, on CPU: `MIMO_RECORD_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden_tokens.py
tests/test_serving_tensor_parallel.py`. The TP 2 request lives in test_serving_tensor_parallel.py (its server).
"""

from __future__ import annotations

import pytest
from conftest import SERVING_DEVICE
from golden import REQUESTS, check_or_record, served_tokens


@pytest.mark.skipif(SERVING_DEVICE != "cpu", reason="golden tokens are float32 CPU tokens; the GPU runs compare "
                                                    "with the offline pipeline on their own device instead")
@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_served_tokens_equal_the_golden_record(triton_server, name):
    text, media, params = REQUESTS[name]
    check_or_record(name, served_tokens(triton_server.grpc_url, text, media, params))
