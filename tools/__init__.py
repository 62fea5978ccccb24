"""Host-side process tools around the core: the `tritonserver` launcher, a server process handle, the demo.

The core (`mimo/`) never imports this package (tests/test_layout.py checks it).
"""
