"""Host -> device copies of the small per-step index lists."""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` as a tensor on `device`.

    On an accelerator the copy goes through pinned memory with `non_blocking=True`: a plain copy of pageable memory
    would synchronise the stream, stalling the host until the GPU has drained the work queued before it.
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
