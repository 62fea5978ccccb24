"""Building blocks shared by the MiMo-V2 language model and its MTP layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimo.models import layer_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """norm(x) `[..., H]`; with `residual`: (norm(x + residual), x + residual). One kernel on CUDA (eager
        and in CUDA graphs; under torch.compile the reference, which inductor fuses itself)."""
        if layer_kernels.takes(x):
            return layer_kernels.rms_norm(x, self.weight, self.eps, residual)
        return self.reference(x, residual)

    def reference(self, x: torch.Tensor,
                  residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if residual is not None:
            x = x + residual
            return self.reference(x), x
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, rotary_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for NeoX RoPE: float32 [T, rotary_dim // 2] each.

    Computed from the positions on every call (no cached table): cheap, capturable in a CUDA graph, and
    nothing to initialise when the model is built on the meta device.
    """
    exponents = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / (base**exponents)  # [rotary_dim / 2]
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, rotary_dim / 2]
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) RoPE on the first 2 * cos.shape[-1] dims of each head; the rest pass through.

    x: [T, heads, head_dim]; cos, sin: [T, rotary_dim // 2]. One kernel on CUDA, as `RMSNorm.forward`.
    """
    if layer_kernels.takes(x) and layer_kernels.rotary_fits(x, cos, sin):
        return layer_kernels.apply_rotary(x, cos, sin)
    return rotary_reference(x, cos, sin)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = cos.shape[-1]
    cos = cos[:, None, :].to(x.dtype)  # [T, 1, rotary_dim / 2]
    sin = sin[:, None, :].to(x.dtype)
    x1, x2, x_pass = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_pass], dim=-1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate rows first, as a fused gate_up GEMM produces them) -> silu(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) of the encoder blocks (ViT with biases, audio tower); the LM's is `moe.DenseMLP`."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
