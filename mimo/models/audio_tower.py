"""MiMo audio understanding tower in the main checkpoint (module prefix `audio_encoder.`; ref §2.5, §6).

RVQ codes from the audio tokenizer are grouped `group_size` frames at a time; each group's per-channel code
embeddings are summed, mixed by a small Qwen2-style transformer that attends only inside the group, flattened
and projected to one LM embedding per group (one per `<|audio_pad|>` token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mimo.config import ConfigError
from mimo.models.audio_tokenizer import DEFAULT_SEGMENT_SIZE, code_length, segment_lengths
from mimo.models.layers import RMSNorm, SwiGLUMLP, apply_rotary, rotary_cos_sin


def audio_token_count(
    t_mel: int,
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    stride_size: int = 2,
    avg_pooler: int = 2,
    group_size: int = 4,
) -> int:
    """LM tokens (`<|audio_pad|>` count) for a log-mel spectrogram of `t_mel` frames (ref §6).

    Each segment of the tokenizer's split gives `code_length` codes (conv stride 2, pooler 2); the tower emits
    one token per `group_size` codes, the last group padded: about ceil(t_mel / 16), 6.25 tokens/s. Keyword
    defaults are the release geometry (tokenizer stride_size / avg_pooler, audio_config group_size /
    audio_segment_size).
    """
    if t_mel < 1:
        raise ValueError(f"t_mel must be >= 1, got {t_mel}")
    codes = sum(
        code_length(n, stride_size=stride_size, avg_pooler=avg_pooler) for n in segment_lengths(t_mel, segment_size)
    )
    return -(-codes // group_size)


# sglang `MiMoAudioEncoderConfig` defaults, keyed by hub `audio_config` name (ref §6 table).
SGLANG_AUDIO_DEFAULTS: dict[str, Any] = {
    "audio_channels": 8,
    "speech_vocab_size": "1025-1025-129-129-129-129-129-129",
    "speech_zeroemb_idx": "1024-1024-128-128-128-128-128-128",
    "group_size": 4,
    "input_local_layers": 6,
    "input_local_dim": 1024,
    "input_local_attn_heads": 64,
    "input_local_head_dim": 16,
    "input_local_intermediate_size": 4096,
    "input_full_attention": True,
    "rope_theta": 640000.0,
    "partial_rotary_factor": 0.334,
    "projection_layers": 1,
    "add_post_norm": False,
    "out_hidden_size": 4096,
    "audio_segment_size": DEFAULT_SEGMENT_SIZE,
}


@dataclass(frozen=True, slots=True)
class AudioConfig:
    """Hub `audio_config` (V2.5 values in comments, ref §6)."""

    audio_channels: int  # 20
    speech_vocab_sizes: tuple[int, ...]  # per channel, hub `speech_vocab_size`; 1280 each
    speech_zeroemb_ids: tuple[int, ...]  # per channel padding ids, hub `speech_zeroemb_idx`; 1024 each
    group_size: int  # 4 codes (25 Hz) per LM token (6.25 Hz)
    input_local_layers: int  # 6
    input_local_dim: int  # 1024
    input_local_attn_heads: int  # 16
    input_local_head_dim: int  # 64
    input_local_intermediate_size: int  # 4096
    input_full_attention: bool  # True: attention inside a group is bidirectional
    rope_theta: float  # 640000
    partial_rotary_factor: float  # 1.0, the only value the Qwen2 local transformer can run
    projection_layers: int  # 2
    add_post_norm: bool  # True
    out_hidden_size: int  # 4096 (= LM hidden)
    audio_segment_size: int  # 6000 mel frames per independently tokenized segment
    rms_norm_eps: float = 1e-6  # not a hub key: the Qwen2Config default sglang builds the local transformer with

    @classmethod
    def from_dict(cls, hub: dict[str, Any]) -> AudioConfig:
        d = {**SGLANG_AUDIO_DEFAULTS, **hub}
        channels = d["audio_channels"]
        return cls(
            audio_channels=channels,
            speech_vocab_sizes=_per_channel(d, "speech_vocab_size", channels),
            speech_zeroemb_ids=_per_channel(d, "speech_zeroemb_idx", channels),
            group_size=d["group_size"],
            input_local_layers=d["input_local_layers"],
            input_local_dim=d["input_local_dim"],
            input_local_attn_heads=d["input_local_attn_heads"],
            input_local_head_dim=d["input_local_head_dim"],
            input_local_intermediate_size=d["input_local_intermediate_size"],
            input_full_attention=bool(d["input_full_attention"]),
            rope_theta=float(d["rope_theta"]),
            partial_rotary_factor=float(d["partial_rotary_factor"]),
            projection_layers=d["projection_layers"],
            add_post_norm=bool(d["add_post_norm"]),
            out_hidden_size=d["out_hidden_size"],
            audio_segment_size=d["audio_segment_size"],
        )

    def __post_init__(self) -> None:
        for key in ("audio_channels", "group_size", "input_local_layers", "input_local_dim", "input_local_attn_heads",
                    "input_local_head_dim", "input_local_intermediate_size", "out_hidden_size", "audio_segment_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"audio_config.{key}={value!r}: expected a positive int")
        for key in ("speech_vocab_sizes", "speech_zeroemb_ids"):
            if len(getattr(self, key)) != self.audio_channels:
                raise ConfigError(f"audio_config {key}={getattr(self, key)}: expected {self.audio_channels} values")
        for channel, (vocab, zero_id) in enumerate(zip(self.speech_vocab_sizes, self.speech_zeroemb_ids)):
            if not 0 <= zero_id < vocab:
                raise ConfigError(
                    f"audio_config channel {channel}: speech_zeroemb_idx {zero_id} is outside speech_vocab_size {vocab}"
                )
        if self.partial_rotary_factor != 1.0:
            raise ConfigError(
                f"audio_config.partial_rotary_factor={self.partial_rotary_factor} is not supported: sglang runs the "
                "local transformer as HF Qwen2, which rotates whole heads (accepted: 1.0)"
            )
        if self.input_local_head_dim % 2:
            raise ConfigError(f"audio_config.input_local_head_dim={self.input_local_head_dim}: RoPE needs an even size")
        if self.projection_layers not in (1, 2):
            raise ConfigError(f"audio_config.projection_layers={self.projection_layers!r}: accepted 1 or 2")


def _per_channel(d: dict[str, Any], key: str, channels: int) -> tuple[int, ...]:
    """Hub value "a-b-c" (one per channel) or a single int / numeric string for every channel."""
    value = d[key]
    try:
        if isinstance(value, str) and "-" in value:
            return tuple(int(part) for part in value.split("-"))
        return (int(value),) * channels
    except ValueError:
        raise ConfigError(f"audio_config.{key}={value!r}: expected an int or dash-separated ints") from None


class LocalAttention(nn.Module):
    """Qwen2 attention (q/k/v biases, no o bias, MHA) over independent groups of `group_size` frames.

    Thousands of 4-frame groups run as one batched SDPA call; no sinks or windows are involved here.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, causal: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.causal = causal
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        groups, group_size, _ = x.shape
        flat = x.flatten(0, 1)  # [G * g, hidden]
        q = apply_rotary(self.q_proj(flat).view(-1, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(flat).view(-1, self.num_heads, self.head_dim), cos, sin)
        v = self.v_proj(flat).view(-1, self.num_heads, self.head_dim)
        q, k, v = (t.view(groups, group_size, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [G, heads, g, head_dim]
        return self.o_proj(out.transpose(1, 2).flatten(2))  # [G, g, hidden]


class LocalDecoderLayer(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        dim = config.input_local_dim
        self.input_layernorm = RMSNorm(dim, eps=config.rms_norm_eps)
        self.self_attn = LocalAttention(
            dim, config.input_local_attn_heads, config.input_local_head_dim, causal=not config.input_full_attention
        )
        self.post_attention_layernorm = RMSNorm(dim, eps=config.rms_norm_eps)
        self.mlp = SwiGLUMLP(dim, config.input_local_intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class InputLocalTransformer(nn.Module):
    """The layers and final norm of sglang's HF `Qwen2Model` (it has no token embedding here)."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(LocalDecoderLayer(config) for _ in range(config.input_local_layers))
        self.norm = RMSNorm(config.input_local_dim, eps=config.rms_norm_eps) if config.add_post_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [G, g, dim] -> [G, g, dim]; every group sees positions 0..g-1."""
        groups, group_size, _ = x.shape
        positions = torch.arange(group_size, device=x.device).repeat(groups)  # [G * g]
        cos, sin = rotary_cos_sin(positions, self.config.input_local_head_dim, self.config.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x if self.norm is None else self.norm(x)


class AudioProjection(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, output_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(input_size, hidden_size, bias=False), nn.GELU(), nn.Linear(hidden_size, output_size, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class MiMoAudioEncoder(nn.Module):
    """compile_layers: on CUDA, run the embedding sum, local transformer and projection through torch.compile
    (fused elementwise work and one host call per forward; the first call compiles). Off by default until its
    parity test (tests/test_encoder_kernels_gpu.py) has run on a GPU."""

    def __init__(self, config: AudioConfig, compile_layers: bool = False):
        super().__init__()
        self.config = config
        self.compile_layers = compile_layers
        self._compiled_embed_groups = None
        dim, group_dim = config.input_local_dim, config.input_local_dim * config.group_size
        self.speech_embeddings = nn.ModuleList(
            nn.Embedding(vocab, dim, padding_idx=zero_id)
            for vocab, zero_id in zip(config.speech_vocab_sizes, config.speech_zeroemb_ids)
        )
        self.input_local_transformer = InputLocalTransformer(config)
        if config.projection_layers == 1:
            self.projection = nn.Linear(group_dim, config.out_hidden_size, bias=False)
        else:
            self.projection = AudioProjection(group_dim, 4 * group_dim, config.out_hidden_size)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [T_code, n_q >= audio_channels] -> [ceil(T_code / group_size), out_hidden_size]."""
        return self.embed_groups(self.group_codes(codes))

    def encode_batch(self, codes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Several code sequences in one forward; one [ceil(T_i / group_size), out_hidden_size] per sequence."""
        if not codes:
            raise ValueError("encode_batch needs at least one code sequence")
        grouped = [self.group_codes(c) for c in codes]
        return list(self.embed_groups(torch.cat(grouped)).split([g.shape[0] for g in grouped]))

    def group_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [T, n_q] -> [ceil(T / g), g, audio_channels]; the last group is padded with the last frame."""
        config = self.config
        if codes.dim() != 2 or codes.shape[0] < 1 or codes.shape[1] < config.audio_channels:
            raise ValueError(
                f"audio codes must be [T_code >= 1, n_q >= {config.audio_channels}], found {tuple(codes.shape)}"
            )
        if codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"audio codes must be integers, found {codes.dtype}")
        device = self.speech_embeddings[0].weight.device
        codes = codes[:, : config.audio_channels].to(device, torch.long)
        out_of_range = (codes < 0) | (codes >= torch.tensor(config.speech_vocab_sizes, device=device))
        if out_of_range.any():
            channel = int(out_of_range.any(dim=0).nonzero()[0])
            raise ValueError(
                f"audio code channel {channel} has values outside [0, {config.speech_vocab_sizes[channel]})"
            )
        pad = -codes.shape[0] % config.group_size
        codes = torch.cat([codes, codes[-1:].expand(pad, -1)])
        return codes.view(-1, config.group_size, config.audio_channels)

    def embed_groups(self, grouped: torch.Tensor) -> torch.Tensor:
        """grouped codes [G, g, channels] -> [G, out_hidden_size]."""
        if not (grouped.is_cuda and self.compile_layers):
            return self._embed_groups(grouped)
        if self._compiled_embed_groups is None:
            self._compiled_embed_groups = torch.compile(self._embed_groups, dynamic=True)
        return self._compiled_embed_groups(grouped)

    def _embed_groups(self, grouped: torch.Tensor) -> torch.Tensor:
        embeds = sum(
            embedding(grouped[..., channel]) for channel, embedding in enumerate(self.speech_embeddings)
        )  # [G, g, dim]
        hidden = self.input_local_transformer(embeds)
        return self.projection(hidden.flatten(1))  # [G, g * dim] -> [G, out_hidden]
