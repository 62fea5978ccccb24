"""MiMo audio tokenizer encoder: log-mel frames -> residual-VQ codes (`audio_tokenizer/` folder; ref §2.5, §6).

conv1 (k3) + GELU, conv2 (k3, stride 2) + GELU (100 -> 50 Hz), pre-LN transformer layers with RoPE and a
per-layer attention window, an optional skip connection, final LayerNorm, an average-pooling Conv1d
(50 -> 25 Hz) + GELU + LayerNorm, and residual vector quantization with Euclidean codebooks.

Long audio is cut into `segment_size`-frame segments that are encoded independently; all segments of a call
run as one padded batch whose results equal encoding each segment alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mimo.config import ConfigError
from mimo.models.encoder_attention import SegmentAttention
from mimo.models.layers import apply_rotary, rotary_cos_sin

# Frames per independently encoded segment: sglang's `audio_segment_size` (60 s at 100 mel frames/s).
DEFAULT_SEGMENT_SIZE = 6000


def code_length(mel_frames, *, stride_size: int, avg_pooler: int):
    """Codes produced by one independently encoded segment of `mel_frames` frames (int or LongTensor).

    conv2 (k3, p1, stride s) gives (n - 1) // s + 1 frames; the pooler pads to a multiple of `avg_pooler`.
    """
    conv_frames = (mel_frames - 1) // stride_size + 1
    return (conv_frames + avg_pooler - 1) // avg_pooler


def segment_lengths(mel_frames: int, segment_size: int) -> list[int]:
    """Split `mel_frames` into full segments plus a shorter remainder."""
    full, rest = divmod(mel_frames, segment_size)
    return [segment_size] * full + ([rest] if rest else [])


# sglang `MiMoAudioTokenizerConfig` defaults of the keys the encoder reads, keyed by hub name.
SGLANG_TOKENIZER_DEFAULTS: dict[str, Any] = {
    "n_mels": 80,
    "d_model": 768,
    "encoder_layers": 8,
    "encoder_attention_heads": 12,
    "encoder_ffn_dim": 3072,
    "rope_theta": 10000.0,
    "kernel_size": 3,
    "stride_size": 2,
    "avg_pooler": 1,
    "encoder_skip_layer_id": None,
    "encoder_causal": False,
    "encoder_attn_window_size": None,
    "hybrid_attention": False,
    "swa_per_block": 2,
    "num_quantizers": 12,
    "codebook_size": None,
    "sampling_rate": 24000,
    "hop_length": 240,
    "activation_function": "gelu",
    "ln_type": "LayerNorm",
    "position_embedding_type": "rope",
    "rope_type": "default",
}


@dataclass(frozen=True, slots=True)
class AudioTokenizerConfig:
    """Encoder part of `audio_tokenizer/config.json`.

    Real geometry, the MiMo-V2.6 tokenizer (ref §6; the V2.5 card's "24 layers: 12 SWA + 12 Full" agrees) in
    comments: 100 mel frames/s in, 25 codes/s out.
    """

    n_mels: int  # 128
    d_model: int  # 1024
    encoder_layers: int  # 24
    encoder_attention_heads: int  # 16
    encoder_ffn_dim: int  # 4096
    rope_theta: float
    kernel_size: int  # 3 (the only size the padding-1 convs support)
    stride_size: int  # 2: conv2 stride, 100 -> 50 Hz
    avg_pooler: int  # 2: pooling conv, 50 -> 25 Hz (1 = no pooler)
    encoder_skip_layer_id: int | None  # 3: output of layer (id - 1) is added before the final norm
    encoder_causal: bool  # True
    encoder_attn_window_size: tuple[int, int]  # (128, 0): flash-attn (left, right), -1 = unbounded
    hybrid_attention: bool  # True: windowed and unbounded layers alternate
    swa_per_block: int  # 2: even layers windowed, odd layers unbounded
    num_quantizers: int  # 20
    codebook_size: tuple[int, ...]  # one per quantizer: (1024, 1024, 256) + (128,) * 17
    sampling_rate: int  # 24000
    hop_length: int  # 240

    @classmethod
    def from_dict(cls, hub: dict[str, Any]) -> AudioTokenizerConfig:
        d = {**SGLANG_TOKENIZER_DEFAULTS, **hub}
        for key in ("activation_function", "ln_type", "position_embedding_type", "rope_type"):
            if d[key] != SGLANG_TOKENIZER_DEFAULTS[key]:
                raise ConfigError(
                    f"audio tokenizer {key}={d[key]!r} is not supported; accepted: {SGLANG_TOKENIZER_DEFAULTS[key]!r}"
                )
        num_quantizers = d["num_quantizers"]
        codebook_size = d["codebook_size"] or [1024]
        if isinstance(codebook_size, int):
            codebook_size = [codebook_size]
        if not isinstance(codebook_size, list) or not codebook_size:
            raise ConfigError(f"audio tokenizer codebook_size={codebook_size!r}: expected an int or a list of ints")
        # a shorter list repeats its last size (sglang `ResidualVectorQuantization`)
        codebook_size = codebook_size + codebook_size[-1:] * (num_quantizers - len(codebook_size))
        return cls(
            n_mels=d["n_mels"],
            d_model=d["d_model"],
            encoder_layers=d["encoder_layers"],
            encoder_attention_heads=d["encoder_attention_heads"],
            encoder_ffn_dim=d["encoder_ffn_dim"],
            rope_theta=float(d["rope_theta"]),
            kernel_size=d["kernel_size"],
            stride_size=d["stride_size"],
            avg_pooler=d["avg_pooler"],
            encoder_skip_layer_id=d["encoder_skip_layer_id"],
            encoder_causal=bool(d["encoder_causal"]),
            encoder_attn_window_size=tuple(d["encoder_attn_window_size"] or (-1, -1)),
            hybrid_attention=bool(d["hybrid_attention"]),
            swa_per_block=d["swa_per_block"],
            num_quantizers=num_quantizers,
            codebook_size=tuple(codebook_size[:num_quantizers]),
            sampling_rate=d["sampling_rate"],
            hop_length=d["hop_length"],
        )

    def __post_init__(self) -> None:
        for key in ("n_mels", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                    "stride_size", "avg_pooler", "swa_per_block", "num_quantizers", "sampling_rate", "hop_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"audio tokenizer {key}={value!r}: expected a positive int")
        window = self.encoder_attn_window_size
        if len(window) != 2 or any(not isinstance(w, int) or w < -1 for w in window):
            raise ConfigError(f"audio tokenizer encoder_attn_window_size={list(window)}: expected [left, right] ints >= -1")
        if self.kernel_size != 3:
            # both convs use padding 1, which keeps lengths only for kernel 3
            raise ConfigError(f"audio tokenizer kernel_size={self.kernel_size!r} is not supported; accepted: 3")
        head_dim, rest = divmod(self.d_model, self.encoder_attention_heads)
        if rest or head_dim % 2:
            raise ConfigError(
                f"audio tokenizer d_model={self.d_model} must split into encoder_attention_heads="
                f"{self.encoder_attention_heads} heads of even size"
            )
        skip = self.encoder_skip_layer_id
        if skip is not None and not (isinstance(skip, int) and 1 <= skip <= self.encoder_layers):
            raise ConfigError(
                f"audio tokenizer encoder_skip_layer_id={skip!r}: expected null or 1..{self.encoder_layers}"
            )
        if len(self.codebook_size) != self.num_quantizers or any(
            not isinstance(size, int) or size < 1 for size in self.codebook_size
        ):
            raise ConfigError(
                f"audio tokenizer codebook_size={list(self.codebook_size)}: expected {self.num_quantizers} positive ints"
            )
        for layer_idx in range(self.encoder_layers):
            self.layer_attention(layer_idx)

    def layer_window(self, layer_idx: int) -> tuple[int, int]:
        """(left, right) flash-attn window of a layer: with `hybrid_attention`, the first `swa_per_block - 1`
        layers of every `swa_per_block` use `encoder_attn_window_size`, the last is unbounded."""
        if self.hybrid_attention and layer_idx % self.swa_per_block == self.swa_per_block - 1:
            return (-1, -1)
        return self.encoder_attn_window_size

    def layer_attention(self, layer_idx: int) -> tuple[bool, int | None]:
        """(causal, window) in `attention_with_sinks` terms for a layer's (left, right) window.

        The reference tokenizer passes `causal=encoder_causal` to flash-attn on every layer; sglang's port drops
        the flag, so its unbounded layers are bidirectional even for a causal tokenizer (ref §6 note). We follow
        the reference: both agree on the windowed layers, where right = 0 already makes them causal.
        """
        left, right = self.layer_window(layer_idx)
        if (left, right) == (-1, -1):
            return self.encoder_causal, None
        if left >= 0 and right == 0:
            return True, left
        if left >= 0 and right == left and not self.encoder_causal:
            return False, left
        raise ConfigError(
            f"audio tokenizer encoder_attn_window_size={list(self.encoder_attn_window_size)} with "
            f"encoder_causal={self.encoder_causal} is not supported; accepted: [-1, -1], [w, 0], or [w, w] "
            "when not causal"
        )

    def code_length(self, mel_frames):
        """Codes of one independently encoded segment (int or LongTensor)."""
        return code_length(mel_frames, stride_size=self.stride_size, avg_pooler=self.avg_pooler)


class TokenizerAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, causal: bool, window: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.causal = causal
        self.window = window
        self.q_proj = nn.Linear(d_model, d_model, bias=True)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)  # the checkpoint has no k bias
        self.v_proj = nn.Linear(d_model, d_model, bias=True)
        self.out_proj = nn.Linear(d_model, d_model, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: SegmentAttention) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(num_tokens, self.num_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        out = attention(q, k, v, scale=self.head_dim**-0.5, causal=self.causal, window=self.window, sinks=None)
        return self.out_proj(out.reshape(num_tokens, -1))  # [T, heads * head_dim] -> [T, d]


class TokenizerLayer(nn.Module):
    def __init__(self, config: AudioTokenizerConfig, layer_idx: int):
        super().__init__()
        causal, window = config.layer_attention(layer_idx)
        self.self_attn = TokenizerAttention(config.d_model, config.encoder_attention_heads, causal, window)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: SegmentAttention) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), cos, sin, attention)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class EuclideanCodebook(nn.Module):
    """Inference view of an EMA-trained codebook: only `embed` is read; the training statistics are kept so
    the state dict matches the checkpoint."""

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        # pinned to float32 whatever the default dtype: the reference quantizes in float32
        embed = nn.init.kaiming_uniform_(torch.empty(codebook_size, dim, dtype=torch.float32))
        self.register_buffer("inited", torch.ones(1, dtype=torch.float32))
        self.register_buffer("cluster_size", torch.zeros(codebook_size, dtype=torch.float32))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())


class VectorQuantization(nn.Module):
    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self._codebook = EuclideanCodebook(codebook_size, dim)


class ResidualVectorQuantization(nn.Module):
    def __init__(self, codebook_sizes: tuple[int, ...], dim: int):
        super().__init__()
        self.layers = nn.ModuleList(VectorQuantization(size, dim) for size in codebook_sizes)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, dim] -> codes [T, num_quantizers]; in float32 like the reference quantizer."""
        residual = x.float()
        codes = []
        for layer in self.layers:
            embed = layer._codebook.embed.float()  # [K, dim]
            # argmin ||r - e||^2 = argmin (||e||^2 - 2 r.e); ties pick the lowest index
            distance = embed.pow(2).sum(-1)[None, :] - 2 * residual @ embed.T  # [T, K]
            indices = distance.argmin(dim=-1)
            residual = residual - embed[indices]
            codes.append(indices)
        return torch.stack(codes, dim=-1)


class ResidualVectorQuantizer(nn.Module):
    def __init__(self, codebook_sizes: tuple[int, ...], dim: int):
        super().__init__()
        self.vq = ResidualVectorQuantization(codebook_sizes, dim)


class TokenizerEncoder(nn.Module):
    """attention_impl: "auto" (FlexAttention on CUDA, the float32 reference elsewhere), "reference" or "flex";
    compile_layers: on the CUDA flex path, run the layer stack through torch.compile (the first call compiles)."""

    def __init__(self, config: AudioTokenizerConfig, attention_impl: str = "auto", compile_layers: bool = True):
        super().__init__()
        self.config = config
        self.attention_impl = attention_impl
        self.compile_layers = compile_layers
        self._compiled_transformer = None
        d = config.d_model
        self.conv1 = nn.Conv1d(config.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=config.stride_size, padding=1)
        self.layers = nn.ModuleList(TokenizerLayer(config, i) for i in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        if config.avg_pooler != 1:
            pool = nn.Conv1d(d, d, config.avg_pooler, stride=config.avg_pooler, bias=False)
            self.down_sample_layer = nn.Sequential(pool, nn.GELU())
            self.down_sample_norm = nn.LayerNorm(d)
        self.quantizer = ResidualVectorQuantizer(config.codebook_size, d)

    def forward(self, mels: torch.Tensor, mel_lens: torch.Tensor) -> torch.Tensor:
        """mels [B, L, n_mels] zero-padded segments, mel_lens [B] -> codes [sum(code_lens), num_quantizers]."""
        return self.quantizer.vq.encode(self.features(mels, mel_lens))

    def features(self, mels: torch.Tensor, mel_lens: torch.Tensor) -> torch.Tensor:
        """Pre-quantizer features of the segments, packed: [sum(code_lens), d_model]."""
        config = self.config
        lengths = mel_lens.tolist()  # host ints before any device work: the only sync of the forward
        seq_lens = [(n - 1) // config.stride_size + 1 for n in lengths]  # conv2 frames per segment
        x = mels.transpose(1, 2).to(self.conv1.weight.dtype)  # [B, n_mels, L]
        # Zero the padding after conv1 so conv2 sees what a lone segment's zero padding gives.
        x = F.gelu(self.conv1(x)) * _valid_mask(mel_lens, x.shape[-1])[:, None, :]
        x = F.gelu(self.conv2(x))  # [B, d, L2]
        hidden = torch.cat([x[b, :, :n].T for b, n in enumerate(seq_lens)])  # [T, d], segments packed
        positions = torch.cat([torch.arange(n, device=x.device) for n in seq_lens])  # [T], from 0 per segment
        cos, sin = rotary_cos_sin(positions, config.d_model // config.encoder_attention_heads, config.rope_theta)
        attention = SegmentAttention(
            seq_lens, x.device, specs=[config.layer_attention(i) for i in range(config.encoder_layers)],
            impl=self.attention_impl,
        )
        compiled = attention.impl == "flex" and self.compile_layers and x.device.type == "cuda"
        hidden = (self.compiled_transformer() if compiled else self.transformer)(hidden, cos, sin, attention)

        if config.avg_pooler != 1:
            pooled_len = -(-x.shape[-1] // config.avg_pooler) * config.avg_pooler
            padded = hidden.new_zeros(len(seq_lens), pooled_len, config.d_model)  # zero tail = a lone segment's
            for b, segment in enumerate(hidden.split(seq_lens)):
                padded[b, : segment.shape[0]] = segment
            pooled = self.down_sample_layer(padded.transpose(1, 2)).transpose(1, 2)  # [B, L3, d]
            code_lens = [config.code_length(n) for n in lengths]
            hidden = self.down_sample_norm(torch.cat([pooled[b, :n] for b, n in enumerate(code_lens)]))  # [T3, d]
        return hidden


    def transformer(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: SegmentAttention
    ) -> torch.Tensor:
        """The layers, the skip connection and the final norm over packed segments: [T, d] -> [T, d]."""
        config = self.config
        skip_after = None if config.encoder_skip_layer_id is None else config.encoder_skip_layer_id - 1
        skip = None
        for layer_idx, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, attention)
            if layer_idx == skip_after:
                skip = hidden
        if skip is not None:
            hidden = hidden + skip
        return self.layer_norm(hidden)

    def compiled_transformer(self):
        """`transformer` through torch.compile: one graph for the whole stack (fused norms, RoPE, GELU around the
        attention kernels, and one host call instead of ~700 launches); dynamic shapes, one compile for every
        audio length."""
        if self._compiled_transformer is None:
            self._compiled_transformer = torch.compile(self.transformer, dynamic=True)
        return self._compiled_transformer


class MiMoAudioTokenizer(nn.Module):
    def __init__(self, config: AudioTokenizerConfig, attention_impl: str = "auto"):
        super().__init__()
        self.config = config
        self.encoder = TokenizerEncoder(config, attention_impl)

    @torch.no_grad()
    def encode(self, mel: torch.Tensor, segment_size: int = DEFAULT_SEGMENT_SIZE) -> torch.Tensor:
        """mel [T_mel, n_mels] -> codes [T_code, num_quantizers] (int64)."""
        return self.encode_batch([mel], segment_size)[0]

    @torch.no_grad()
    def encode_batch(self, mels: list[torch.Tensor], segment_size: int = DEFAULT_SEGMENT_SIZE) -> list[torch.Tensor]:
        """Encode several log-mel spectrograms in one padded batch of segments.

        Args:
            mels: each [T_mel, n_mels], T_mel >= 1.
            segment_size: mel frames per independently encoded segment.
        Returns:
            one int64 [T_code, num_quantizers] per mel; T_code = sum of `code_length` over its segments.
        """
        if not mels:
            raise ValueError("encode_batch needs at least one mel spectrogram")
        for i, mel in enumerate(mels):
            if mel.dim() != 2 or mel.shape[1] != self.config.n_mels or mel.shape[0] < 1:
                raise ValueError(f"mel {i} must be [T_mel >= 1, {self.config.n_mels}], found {tuple(mel.shape)}")
        device = self.encoder.conv1.weight.device
        per_mel = [segment_lengths(mel.shape[0], segment_size) for mel in mels]
        lengths = [n for segs in per_mel for n in segs]
        segments = torch.cat([mel.to(device) for mel in mels]).split(lengths)
        mel_lens = torch.tensor(lengths, device=device)
        codes = self.encoder(nn.utils.rnn.pad_sequence(segments, batch_first=True), mel_lens)
        return list(codes.split([sum(self.config.code_length(n) for n in segs) for segs in per_mel]))


def _valid_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, max_len] bool, True at positions < lengths[b]."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
