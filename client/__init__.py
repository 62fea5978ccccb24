"""Client for the MiMo Triton ensemble: `python -m client` and the importable `MiMoClient`."""

from client.mimo_client import GenerationError, GenerationSummary, MiMoClient

__all__ = ["GenerationError", "GenerationSummary", "MiMoClient"]
