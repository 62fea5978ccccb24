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


def copy_into(target: torch.Tensor, values: list) -> None:
    """Writes `values` into the first `len(values)` elements of the 1-D device tensor `target`, as `to_device` copies
    (one pinned, non-blocking copy on an accelerator): how a step fills a CUDA graph's static inputs."""
    host = torch.tensor(values, dtype=target.dtype)
    if target.device.type == "cpu":
        target[:len(values)].copy_(host)
    else:
        target[:len(values)].copy_(host.pin_memory(), non_blocking=True)
