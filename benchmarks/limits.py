"""The two ceilings every benchmark divides by, measured in the same run: device-to-device copy bandwidth (the
practical HBM limit) and the bf16 matrix-product rate."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    return repeats * 2 * src.numel() / (time.perf_counter() - start)


def gemm_rate(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an n^3 bf16 matrix product on random data, inputs rotated over three pairs."""
    pairs = [(torch.randn(n, n, device=device, dtype=torch.bfloat16),
              torch.randn(n, n, device=device, dtype=torch.bfloat16)) for _ in range(3)]
    for a, b in pairs:
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for i in range(repeats):
        a, b = pairs[i % 3]
        a @ b
    synchronize(device)
    return repeats * 2 * n**3 / (time.perf_counter() - start)
