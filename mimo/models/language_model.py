"""MiMo-V2 language model: hybrid full / sliding-window attention decoder with routed-expert MLPs.

Built for one rank (`ParallelRank`; one process by default): the layers hold that rank's slices in their own form
(fused qkv_proj and gate_up, packed experts; ARCHITECTURE.md "Checkpoint format"). Tokens of all sequences in a
step are flattened into one [T] axis and the `AttentionBackend` knows the sequence boundaries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimo.config import MiMoV2Config
from mimo.models.attention import AttentionBackend
from mimo.models.decoder_layer import MiMoV2DecoderLayer
from mimo.models.layers import RMSNorm, rotary_cos_sin
from mimo.models.mtp import MiMoV2MTP
from mimo.parallel.mapping import SINGLE_RANK, ParallelRank, rank_config


class MiMoV2Model(nn.Module):
    def __init__(self, config: MiMoV2Config, parallel: ParallelRank = SINGLE_RANK):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MiMoV2DecoderLayer(config, i, config.layer_types[i], config.moe_layers[i], parallel)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mtp = MiMoV2MTP(config, parallel) if config.num_nextn_predict_layers > 0 else None

    def forward(self, positions: torch.Tensor, attn: AttentionBackend, input_embeds: torch.Tensor) -> torch.Tensor:
        """Residual stream after the last layer, before `norm` (the hidden state MTP layers consume): [T, H]."""
        if positions.shape != input_embeds.shape[:1]:
            raise ValueError(
                f"positions {tuple(positions.shape)} must be [T] for input_embeds {tuple(input_embeds.shape)}"
            )
        rope = {}
        for layer_type in set(self.config.layer_types):
            spec = self.config.attention_spec(layer_type)
            rope[layer_type] = rotary_cos_sin(positions, spec.rotary_dim, spec.rope_theta)
        hidden, residual = input_embeds, None
        for layer in self.layers:
            hidden, residual = layer.forward_residual(hidden, residual, rope[layer.layer_type], attn)
        return hidden if residual is None else hidden + residual


class MiMoV2ForCausalLM(nn.Module):
    def __init__(self, config: MiMoV2Config, parallel: ParallelRank = SINGLE_RANK):
        """`config`: the whole model's; `self.config` is this rank's (local head counts: what sizes its KV cache)."""
        super().__init__()
        parallel.mapping.check_model(config)
        self.parallel = parallel
        self.model = MiMoV2Model(config, parallel)
        self.config = self.model.config = rank_config(config, parallel.tp_size)
        # Tied checkpoints have no `lm_head.weight`; compute_logits then reads the embedding table.
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def embed(self, input_ids: torch.Tensor, prompt_table: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [T, H]; ids >= vocab_size select prompt_table[id - vocab_size] (TRT-LLM contract).

        Args:
            input_ids: [T] int64 in [0, vocab_size + P): checked where requests are admitted (`LLMEngine.add_request`),
                not here, which would cost a host sync per call.
            prompt_table: [P, H] encoder outputs (image / audio rows), or None.
        """
        vocab_size, hidden_size = self.config.vocab_size, self.config.hidden_size
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be [T], found {tuple(input_ids.shape)}")
        if prompt_table is not None and (prompt_table.dim() != 2 or prompt_table.shape[1] != hidden_size):
            raise ValueError(f"prompt_table must be [P, {hidden_size}], found {tuple(prompt_table.shape)}")
        num_rows = 0 if prompt_table is None else prompt_table.shape[0]
        is_prompt = input_ids >= vocab_size  # [T]
        embeds = self._embed_tokens(input_ids.masked_fill(is_prompt, 0))  # [T, H]
        if num_rows > 0:
            prompt_rows = prompt_table[(input_ids - vocab_size).clamp(min=0)]  # [T, H]
            embeds = torch.where(is_prompt[:, None], prompt_rows.to(embeds.dtype), embeds)
        return embeds

    def forward(self, positions: torch.Tensor, attn: AttentionBackend, input_embeds: torch.Tensor) -> torch.Tensor:
        """positions [T], input_embeds [T, H] -> final-normed hidden states [T, H]."""
        return self.model.norm(self.model(positions, attn, input_embeds))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, vocab]."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def forward_mtp(
        self,
        mtp_idx: int,
        positions: torch.Tensor,
        attn: AttentionBackend,
        next_token_ids: torch.Tensor,
        target_hidden: torch.Tensor,
        prompt_table: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draft hidden state of MTP layer `mtp_idx` (feed it to `compute_logits`).

        Args:
            positions: [T] positions of the target tokens whose hidden states are given.
            next_token_ids: [T] the token following each of those positions, embedded as `embed` does (ids >=
                vocab_size, multimodal positions, read `prompt_table`: the embedding the target saw there).
            target_hidden: [T, H] the target model's pre-final-norm hidden states (`self.model(...)`).
        Returns:
            [T, H] final-normed hidden states predicting the token after `next_token_ids`.
        """
        if self.model.mtp is None:
            raise ValueError("this model has no MTP layers (config num_nextn_predict_layers = 0)")
        token_embeds = self.embed(next_token_ids, prompt_table)
        return self.model.mtp(mtp_idx, positions, attn, token_embeds, target_hidden)

    def _embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.model.embed_tokens(token_ids)
        if self.config.scale_emb is not None:
            embeds = embeds * self.config.scale_emb
        return embeds
