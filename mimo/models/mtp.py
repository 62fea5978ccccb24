"""MiMo-V2 multi-token-prediction draft layers `model.mtp.layers.{k}` (ref §9).

Each layer drafts one more token: it fuses the embedding of the next token with the target model's
pre-final-norm hidden state, runs one sliding-window decoder block with a dense MLP, and normalises; the
caller projects the result with the shared `lm_head` (`MiMoV2ForCausalLM.compute_logits`).
"""

from __future__ import annotations

import torch
from torch import nn

from mimo.config import MiMoV2Config
from mimo.models.attention import AttentionBackend
from mimo.models.decoder_layer import MiMoV2DecoderLayer, RopeTables
from mimo.models.layers import RMSNorm, rotary_cos_sin
from mimo.parallel.mapping import SINGLE_RANK, ParallelRank


class MiMoV2MTPLayer(MiMoV2DecoderLayer):
    """A sliding-window dense decoder block plus `enorm`, `hnorm`, `eh_proj` and `final_layernorm` (hub names)."""

    def __init__(self, config: MiMoV2Config, mtp_idx: int, parallel: ParallelRank = SINGLE_RANK):
        # MTP layers sit after the main layers in the attention backend's layer numbering.
        super().__init__(config, config.num_hidden_layers + mtp_idx, "sliding", is_moe=False, parallel=parallel)
        hidden = config.hidden_size
        self.enorm = RMSNorm(hidden, config.layernorm_epsilon)
        self.hnorm = RMSNorm(hidden, config.layernorm_epsilon)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.final_layernorm = RMSNorm(hidden, config.layernorm_epsilon)

    def forward(
        self, token_embeds: torch.Tensor, target_hidden: torch.Tensor, rope: RopeTables, attn: AttentionBackend
    ) -> torch.Tensor:
        """token_embeds, target_hidden: [T, H] -> final-normed draft hidden state [T, H]."""
        fused = torch.cat([self.enorm(token_embeds), self.hnorm(target_hidden)], dim=-1)  # [T, 2H], token first
        return self.final_layernorm(super().forward(self.eh_proj(fused), rope, attn))


class MiMoV2MTP(nn.Module):
    def __init__(self, config: MiMoV2Config, parallel: ParallelRank = SINGLE_RANK):
        super().__init__()
        self.layers = nn.ModuleList(
            MiMoV2MTPLayer(config, k, parallel) for k in range(config.num_nextn_predict_layers)
        )
        self.rotary_dim = config.sliding_attention.rotary_dim
        self.rope_theta = config.sliding_attention.rope_theta

    def forward(
        self,
        mtp_idx: int,
        positions: torch.Tensor,
        attn: AttentionBackend,
        token_embeds: torch.Tensor,
        target_hidden: torch.Tensor,
    ) -> torch.Tensor:
        rope = rotary_cos_sin(positions, self.rotary_dim, self.rope_theta)
        return self.layers[mtp_idx](token_embeds, target_hidden, rope, attn)  # [T, H]
