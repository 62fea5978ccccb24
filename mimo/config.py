"""MiMo-V2 language-model config: hub `config.json` -> typed, validated dataclass.

All defaults and fallbacks live in `MiMoV2Config.from_hf_config`; modules never read the raw dict.
The multimodal sub-configs (`vision_config`, `audio_config`, `processor_config`) are kept as raw dicts
and parsed by their own modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHITECTURES = ("MiMoV2ForCausalLM", "MiMoV2FlashForCausalLM")
MODEL_TYPES = ("mimo_v2", "mimo_v2_flash")
LAYER_TYPES = ("full", "sliding")
_FP8_BLOCK = (128, 128)


class ConfigError(ValueError):
    """A config.json value this implementation does not support (names the key, value and accepted values)."""


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """Geometry of one attention layer kind ("full" or "sliding")."""

    num_heads: int
    num_kv_heads: int
    head_dim: int  # q/k head dim
    v_head_dim: int
    rotary_dim: int  # first `rotary_dim` dims of each q/k head are rotated (NeoX style)
    rope_theta: float
    sliding_window: int | None  # a query sees itself plus this many previous tokens; None = full causal
    has_sinks: bool  # learned per-head `attention_sink_bias`


@dataclass(frozen=True, slots=True)
class QuantizationConfig:
    """Block-wise FP8 e4m3 weights with a `weight_scale_inv` grid (ref §2.1)."""

    weight_block_size: tuple[int, int]
    excluded_modules: tuple[str, ...]  # module names the checkpoint keeps unquantized, as listed by the config


@dataclass(frozen=True, slots=True)
class MiMoV2Config:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int  # dense MLP width (dense layers and MTP blocks)
    layernorm_epsilon: float
    max_position_embeddings: int
    partial_rotary_factor: float
    full_attention: AttentionSpec
    sliding_attention: AttentionSpec
    attention_value_scale: float | None  # v <- v * scale before attention and before any KV write
    layer_types: tuple[str, ...]  # per layer: "full" | "sliding"
    moe_layers: tuple[bool, ...]  # per layer: routed-expert MLP (True) or dense MLP (False)
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    attention_projection_layout: str | None  # None = split q/k/v in the checkpoint; "fused_qkv"
    fused_qkv_tp: int | None  # TP interleave factor of a fused qkv_proj checkpoint (ref §3)
    quantization: QuantizationConfig | None
    num_nextn_predict_layers: int  # MTP draft layers (model.mtp.layers.k)
    tie_word_embeddings: bool
    scale_emb: float | None
    pad_token_id: int | None
    eos_token_ids: tuple[int, ...]
    vision_config: dict[str, Any] | None
    audio_config: dict[str, Any] | None
    processor_config: dict[str, Any] | None

    @property
    def is_multimodal(self) -> bool:
        return self.vision_config is not None and self.audio_config is not None

    def attention_spec(self, layer_type: str) -> AttentionSpec:
        if layer_type == "full":
            return self.full_attention
        if layer_type == "sliding":
            return self.sliding_attention
        raise ConfigError(f"layer type {layer_type!r} is not one of {LAYER_TYPES}")

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> MiMoV2Config:
        path = Path(checkpoint_dir) / "config.json"
        with open(path, encoding="utf-8") as f:
            hf_config = json.load(f)
        if not isinstance(hf_config, dict):
            raise ConfigError(f"{path} must hold a JSON object, found {type(hf_config).__name__}")
        return cls.from_hf_config(hf_config)

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> MiMoV2Config:
        architectures = d.get("architectures") or []
        architecture = next((a for a in architectures if a in ARCHITECTURES), None)
        if architecture is None:
            raise ConfigError(f"architectures={architectures!r}: expected one of {ARCHITECTURES}")
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type={model_type!r}: expected one of {MODEL_TYPES}")

        num_layers = _require(d, "num_hidden_layers", int)
        _check_value(d, "hidden_act", "silu", ("silu",))
        _check_value(d, "attention_bias", False, (False,))
        _check_value(d, "scoring_func", "sigmoid", ("sigmoid",))
        _check_value(d, "topk_method", "noaux_tc", ("noaux_tc",))
        if d.get("n_shared_experts") not in (None, 0):
            raise ConfigError(f"n_shared_experts={d['n_shared_experts']!r}: expected null or 0 (MiMo-V2 has none)")
        _parse_rope_scaling(d.get("rope_scaling"))

        layer_types = _parse_layer_types(d, num_layers)
        partial_rotary_factor = float(d.get("partial_rotary_factor", 1.0))
        if not 0.0 < partial_rotary_factor <= 1.0:
            raise ConfigError(f"partial_rotary_factor={partial_rotary_factor!r}: expected a value in (0, 1]")
        full_attention, sliding_attention = _parse_attention_specs(d, layer_types, partial_rotary_factor)

        n_routed_experts = _require(d, "n_routed_experts", int)
        num_experts_per_tok = _require(d, "num_experts_per_tok", int)
        n_group = d.get("n_group") or 1
        topk_group = d.get("topk_group") or 1
        if n_routed_experts % n_group != 0 or not 1 <= topk_group <= n_group:
            raise ConfigError(
                f"n_group={n_group}, topk_group={topk_group}: n_routed_experts={n_routed_experts} must split "
                f"into n_group equal groups and 1 <= topk_group <= n_group"
            )
        if not 1 <= num_experts_per_tok <= n_routed_experts * topk_group // n_group:
            raise ConfigError(
                f"num_experts_per_tok={num_experts_per_tok}: expected 1..{n_routed_experts * topk_group // n_group} "
                f"(experts in the {topk_group} selected groups)"
            )
        routed_scaling_factor = d.get("routed_scaling_factor")
        # Releases ship 3 MTP layers, but some hub configs omit the key; absent means "load no MTP layers".
        num_mtp_layers = d.get("num_nextn_predict_layers") or 0
        if not isinstance(num_mtp_layers, int) or isinstance(num_mtp_layers, bool) or num_mtp_layers < 0:
            raise ConfigError(f"num_nextn_predict_layers={num_mtp_layers!r}: expected a non-negative int")

        layout = d.get("attention_projection_layout")
        if layout not in (None, "fused_qkv"):
            raise ConfigError(f"attention_projection_layout={layout!r}: expected 'fused_qkv' or unset")

        eos = d.get("eos_token_id")
        eos_token_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        scale_emb = d.get("scale_emb")
        return cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=_require(d, "vocab_size", int),
            hidden_size=_require(d, "hidden_size", int),
            num_hidden_layers=num_layers,
            intermediate_size=_require(d, "intermediate_size", int),
            layernorm_epsilon=float(_require(d, "layernorm_epsilon", (int, float))),
            # `context_len` sizes the RoPE range when present (sglang); releases also carry max_position_embeddings.
            max_position_embeddings=int(d.get("context_len") or d.get("max_position_embeddings") or 32768),
            partial_rotary_factor=partial_rotary_factor,
            full_attention=full_attention,
            sliding_attention=sliding_attention,
            attention_value_scale=d.get("attention_value_scale"),
            layer_types=layer_types,
            moe_layers=_parse_moe_layers(d.get("moe_layer_freq"), num_layers),
            moe_intermediate_size=_require(d, "moe_intermediate_size", int),
            n_routed_experts=n_routed_experts,
            num_experts_per_tok=num_experts_per_tok,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            # The hub stores null, meaning no scaling (sglang hard-codes 1.0).
            routed_scaling_factor=1.0 if routed_scaling_factor is None else float(routed_scaling_factor),
            attention_projection_layout=layout,
            fused_qkv_tp=_require(d, "num_key_value_heads", int) if layout == "fused_qkv" else None,
            quantization=_parse_quantization(d.get("quantization_config")),
            num_nextn_predict_layers=num_mtp_layers,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            scale_emb=None if scale_emb is None else float(scale_emb),
            pad_token_id=d.get("pad_token_id"),
            eos_token_ids=eos_token_ids,
            vision_config=d.get("vision_config"),
            audio_config=d.get("audio_config"),
            processor_config=d.get("processor_config"),
        )


def _require(d: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if d.get(key) is None:
        raise ConfigError(f"config.json is missing required key {key!r}")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected {kind}")
    return value


def _check_value(d: dict[str, Any], key: str, default: Any, accepted: tuple[Any, ...]) -> None:
    value = d.get(key, default)
    if value not in accepted:
        raise ConfigError(f"{key}={value!r} is not supported; accepted: {accepted}")


def _parse_rope_scaling(rope_scaling: Any) -> None:
    if rope_scaling is None:
        return
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type")) if isinstance(rope_scaling, dict) else None
    if rope_type != "default":
        raise ConfigError(
            f"rope_scaling={rope_scaling!r} is not supported; accepted: null or {{'rope_type': 'default'}}"
        )


def _parse_layer_types(d: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    pattern = d.get("hybrid_layer_pattern")
    block_size = d.get("hybrid_block_size")
    if pattern is not None:
        if not isinstance(pattern, list) or len(pattern) != num_layers or any(p not in (0, 1) for p in pattern):
            raise ConfigError(
                f"hybrid_layer_pattern={pattern!r}: expected a list of {num_layers} values in (0, 1) (1 = sliding)"
            )
        return tuple("sliding" if p == 1 else "full" for p in pattern)
    if block_size is not None:
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ConfigError(f"hybrid_block_size={block_size!r}: expected a positive int")
        return tuple("full" if (i + 1) % block_size == 0 else "sliding" for i in range(num_layers))
    return ("full",) * num_layers


def _parse_moe_layers(moe_layer_freq: Any, num_layers: int) -> tuple[bool, ...]:
    if isinstance(moe_layer_freq, list):
        if len(moe_layer_freq) != num_layers or any(not isinstance(f, (int, bool)) for f in moe_layer_freq):
            raise ConfigError(f"moe_layer_freq={moe_layer_freq!r}: expected a list of {num_layers} ints (truthy = MoE)")
        return tuple(bool(f) for f in moe_layer_freq)
    if isinstance(moe_layer_freq, int) and not isinstance(moe_layer_freq, bool) and moe_layer_freq >= 1:
        return tuple(i % moe_layer_freq == 0 for i in range(num_layers))
    raise ConfigError(
        f"moe_layer_freq={moe_layer_freq!r}: expected a list of {num_layers} ints or a positive int period"
    )


def _parse_sliding_window(d: dict[str, Any]) -> int | None:
    for key in ("sliding_window_size", "sliding_window", "window_size"):
        window = d.get(key)
        if window is not None:
            if not isinstance(window, int) or isinstance(window, bool) or window < 1:
                raise ConfigError(f"{key}={window!r}: expected a positive int")
            return window
    return None


def _parse_attention_specs(
    d: dict[str, Any], layer_types: tuple[str, ...], partial_rotary_factor: float
) -> tuple[AttentionSpec, AttentionSpec]:
    num_heads = _require(d, "num_attention_heads", int)
    num_kv_heads = _require(d, "num_key_value_heads", int)
    head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
    rope_theta = float(d.get("rope_theta", 10000.0))
    swa_head_dim = d.get("swa_head_dim") or head_dim
    window = _parse_sliding_window(d)
    if "sliding" in layer_types and window is None:
        raise ConfigError(
            "config has sliding layers but none of sliding_window_size / sliding_window / window_size is set"
        )
    full = AttentionSpec(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        v_head_dim=d.get("v_head_dim") or head_dim,
        rotary_dim=int(head_dim * partial_rotary_factor),
        rope_theta=rope_theta,
        sliding_window=None,
        has_sinks=bool(d.get("add_full_attention_sink_bias", False)),
    )
    sliding = AttentionSpec(
        num_heads=d.get("swa_num_attention_heads") or num_heads,
        num_kv_heads=d.get("swa_num_key_value_heads") or num_kv_heads,
        head_dim=swa_head_dim,
        v_head_dim=d.get("swa_v_head_dim") or swa_head_dim,
        rotary_dim=int(swa_head_dim * partial_rotary_factor),
        rope_theta=float(d.get("swa_rope_theta") or rope_theta),
        sliding_window=window,
        has_sinks=bool(d.get("add_swa_attention_sink_bias", False)),
    )
    for prefix, spec in (("", full), ("swa_", sliding)):
        if spec.num_heads % spec.num_kv_heads != 0:
            raise ConfigError(
                f"{prefix}num_attention_heads={spec.num_heads} is not a multiple of "
                f"{prefix}num_key_value_heads={spec.num_kv_heads}"
            )
        if spec.rotary_dim % 2 != 0:
            raise ConfigError(
                f"int({prefix}head_dim * partial_rotary_factor) = {spec.rotary_dim}: the rotary dim must be even"
            )
    return full, sliding


def _parse_quantization(quant: Any) -> QuantizationConfig | None:
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise ConfigError(f"quantization_config={quant!r}: expected an object")
    method = quant.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"quantization_config.quant_method={method!r} is not supported; accepted: ('fp8',)")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"quantization_config.fmt={fmt!r} is not supported; accepted: ('e4m3',)")
    activation_scheme = quant.get("activation_scheme", "dynamic")
    if activation_scheme != "dynamic":
        raise ConfigError(
            f"quantization_config.activation_scheme={activation_scheme!r} is not supported; accepted: ('dynamic',)"
        )
    block = quant.get("weight_block_size")
    if block is None or tuple(block) != _FP8_BLOCK:
        raise ConfigError(f"quantization_config.weight_block_size={block!r} is not supported; accepted: [128, 128]")
    # Different exporters name the unquantized-module list differently.
    excluded = quant.get("modules_to_not_convert") or quant.get("ignored_layers") or ()
    return QuantizationConfig(weight_block_size=_FP8_BLOCK, excluded_modules=tuple(excluded))
