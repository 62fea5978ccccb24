"""The server's drain protocol: the launcher creates `$MIMO_DRAIN_FILE` when shutdown starts.

A model holding open streams asks `draining()` in its loop; once true it ends every open stream with a final
error response carrying `SHUTTING_DOWN` (Triton code UNAVAILABLE) and refuses new requests with it.

The launcher also gives the models `$MIMO_SHM_PREFIX`, the server's shared-memory prefix: a region a model creates
under it (a landing pool, `mimo.epd.landing`) is removed with the server's own if the server dies.
"""

from __future__ import annotations

import os

SHUTTING_DOWN = "server is shutting down"
# a gauge (label `model`) of the requests each stream-holding model has open; the launcher's drain waits for 0
IN_FLIGHT_METRIC = "mimo_requests_in_flight"
IN_FLIGHT_DESCRIPTION = "requests a model holds open (streams included)"  # one text: the models share the family


SHM_PREFIX_ENV = "MIMO_SHM_PREFIX"


def shm_prefix(default: str = "mimo_") -> str:
    """The server's shared-memory prefix ($MIMO_SHM_PREFIX), `default` outside a launched server."""
    return os.environ.get(SHM_PREFIX_ENV) or default


def draining() -> bool:
    """True once the launcher created $MIMO_DRAIN_FILE (False when the variable is unset); one stat."""
    path = os.environ.get("MIMO_DRAIN_FILE")
    return bool(path) and os.path.exists(path)
# the server's own gRPC address (host:port), set by the launcher from its flags: the entry streams mimo_llm through it
SELF_GRPC_URL_ENV = "MIMO_SELF_GRPC_URL"
