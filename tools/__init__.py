"""Host-side tools around the core: the `tritonserver` launcher, a server process handle, the demo, and the checks
of built artifacts (`python -m tools logits|verify`).

The core (`mimo/`) never imports this package (tests/test_layout.py checks it).
"""
