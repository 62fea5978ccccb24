"""Does MiMo-V2.5 (310B) / V2.5-Pro (1.02T) fit on 8 x H200, in bf16 and in FP8 as shipped, and how much KV is left?

    python -m benchmarks.memory_fit [--gpus 8] [--sequences 64] [--json OUT.json]

CPU only, by arithmetic over the real modules: each rank's `MiMoV2ForCausalLM` (with its MTP layers) is built on the
`meta` device for a `ParallelRank` of the deployment, so the bytes follow the code's own sharding (`mimo.parallel.
mapping`: attention / dense MLP split by TP, KV heads replicated past their count, experts by EP then moe-TP,
embeddings / lm_head / norms / router / MTP eh_proj replicated). FP8 is the hub format as a TP deployment serves it:
e4m3 for every tensor `builders.tiny.FP8_SUFFIXES` names (q/k/v or fused qkv, dense and expert gate/up/down), each
rank tensor with the float32 `weight_scale_inv` of its own 128x128 grid, exactly the entries `builders convert
--dtype fp8` plans for the rank files (`per_stored_tensor`, `rank_file_entries`); everything else stays as the module
holds it (bf16; the router's `e_score_correction_bias` float32). V2.5's vision tower, audio encoder and audio
tokenizer (bf16) sit on GPU 0 as in the colocated deployment. KV bytes come from the engine's own geometry
(`mimo.engine.kv_cache.kv_layer_specs`, `block_bytes`, `sliding_ring_tokens`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from builders.presets import PRESETS, hub_config
from builders.convert import per_stored_tensor, rank_file_entries
from builders.tiny import FP8_SUFFIXES
from mimo.config import MiMoV2Config
from mimo.engine.block_manager import sliding_ring_tokens
from mimo.engine.kv_cache import LayerKind, blocks_for, block_bytes, kv_layer_specs
from mimo.loading import build_module, language_model_reads
from mimo.models.audio_tokenizer import AudioTokenizerConfig, MiMoAudioTokenizer
from mimo.models.audio_tower import AudioConfig, MiMoAudioEncoder
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.models.linear import ParallelLinear
from mimo.models.vision_tower import MiMoVisionTransformer, VisionConfig
from mimo.parallel.mapping import Mapping, ParallelRank, rank_config

GIB = 1024**3
# The device tool reports an H200 as "about 139 GiB" (torch sees ~140 GiB of the 141 GB HBM3e); 139 GiB is the
# conservative capacity used here.
GPU_BYTES = 139 * GIB
RESERVE_BYTES = 10 * GIB  # per GPU: CUDA context, NCCL buffers, activations of a 512-token step, GEMM workspace
STORAGE_DTYPE = torch.bfloat16
KV_DTYPE = torch.bfloat16
# Token ids only name specials; the vocab width is the preset's min_vocab_size (the real 152576).
_TOKEN_IDS = {"vocab_size": 151680, "eos_token_id": 151645, "pad_token_id": 151643}

# V2.5-Pro (ref mimo_architecture.md §1.2): the V2.5 schema with these values; PRO_UNVERIFIED says which of them the
# reference marks as not confirmed for V2.5-Pro itself.
PRO_LAYERS = 70
PRO_FULL_PERIOD = 7  # 10 full / 60 SWA; layer i full iff (i + 1) % 7 == 0 (exact indices unknown)
PRO_WIDTHS = {
    "hidden_size": 6144,
    "num_attention_heads": 128,
    "num_key_value_heads": 8,
    "swa_num_attention_heads": 128,
    "swa_num_key_value_heads": 8,
    "head_dim": 192,
    "v_head_dim": 128,
    "swa_head_dim": 192,
    "swa_v_head_dim": 128,
    "n_routed_experts": 384,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 2048,
    "intermediate_size": 16384,
    "vocab_size": 152576,
    "num_nextn_predict_layers": 3,
    "attention_value_scale": 0.612,
}
PRO_UNVERIFIED = {
    "vocab_size": "'?' in the reference (same tokenizer presumably)",
    "swa_num_attention_heads / swa_num_key_value_heads": "128 / 8 from a V2.6-Pro fixture (3P)",
    "full-layer indices": "10 full / 60 SWA; which 10 is not found ((i+1)%7==0 assumed)",
    "intermediate_size": "16384 (3P)",
    "attention_value_scale": "0.612 (3P V2.6-Pro; no effect on memory)",
}
REFERENCE_PARAMS = {"MiMo-V2.5": 310e9, "MiMo-V2.5-Pro": 1.02e12}  # ref §1.2 (LM + MTP; encoders separate)


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    config: MiMoV2Config
    encoder_configs: dict[str, dict[str, Any]] | None  # vision / audio / audio tokenizer; None: text only
    unverified: dict[str, str]


def v2_5_model(num_layers: int | None = None, preset: str = "v2.5") -> Model:
    """MiMo-V2.5 from `builders.presets` (the real 48 layers unless `num_layers`), encoders included."""
    spec = PRESETS[preset]
    d = hub_config(spec, num_layers=num_layers or spec.num_layers, token_ids=_TOKEN_IDS, fp8=True, fused_qkv=True)
    encoders = {"vision": d["vision_config"], "audio": d["audio_config"],
                "audio_tokenizer": spec.audio_tokenizer_config}
    name = "MiMo-V2.5" if preset == "v2.5" else f"{preset} preset"
    return Model(name, MiMoV2Config.from_hf_config(d), encoders, {})


def v2_5_pro_model() -> Model:
    """MiMo-V2.5-Pro: the V2.5 schema with the §1.2 Pro values (text only)."""
    d = hub_config(PRESETS["v2.5"], num_layers=PRO_LAYERS, token_ids=_TOKEN_IDS, fp8=True, fused_qkv=True)
    d.update(PRO_WIDTHS)
    d["hybrid_layer_pattern"] = [0 if (i + 1) % PRO_FULL_PERIOD == 0 else 1 for i in range(PRO_LAYERS)]
    d["moe_layer_freq"] = [0] + [1] * (PRO_LAYERS - 1)
    for key in ("vision_config", "audio_config", "processor_config"):
        del d[key]
    return Model("MiMo-V2.5-Pro", MiMoV2Config.from_hf_config(d), None, PRO_UNVERIFIED)


def _is_fp8(layer: ParallelLinear) -> bool:
    return any(f".{part}.weight".endswith(FP8_SUFFIXES) for part in layer.hub_parts)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.dtype.itemsize


def language_rank_bytes(config: MiMoV2Config, parallel: ParallelRank) -> dict[str, int]:
    """One rank's language model + MTP: parameter count, bytes in bf16, and bytes in FP8 as its deployment rank file
    stores them (`builders convert --dtype fp8`: each FP8 tensor re-blocked on a 128x128 grid of its own)."""
    model = build_module(lambda: MiMoV2ForCausalLM(config, parallel), STORAGE_DTYPE)
    tensors = model.state_dict()  # parameters and persistent buffers: what a checkpoint holds
    fp8_weights = {f"{name}.weight" for name, m in model.named_modules()
                   if isinstance(m, ParallelLinear) and _is_fp8(m)}
    floating = sum(_tensor_bytes(t) for name, t in tensors.items() if name not in fp8_weights)
    fp8 = scales = 0
    bytes_of_target: dict[str, tuple[int, int]] = {}  # every expert of a layer holds the same slice: computed once
    for read in language_model_reads(model, fused_qkv_tp=config.fused_qkv_tp, rank_files=False):
        if read.layer is None or not _is_fp8(read.layer):
            continue
        if read.target not in bytes_of_target:
            entries = [entry for part in per_stored_tensor(read) for entry in rank_file_entries(
                part.hub_names[0], torch.float8_e4m3fn, _rank_shape(part))]  # fmt: skip
            sizes = [(math.prod(shape) * dtype.itemsize, dtype == torch.float32) for _, dtype, shape in entries]
            bytes_of_target[read.target] = (sum(n for n, _ in sizes), sum(n for n, is_scale in sizes if is_scale))
        fp8 += bytes_of_target[read.target][0]
        scales += bytes_of_target[read.target][1]
    return {
        "params": sum(t.numel() for t in tensors.values()),
        "bf16_bytes": sum(_tensor_bytes(t) for t in tensors.values()),
        "fp8_bytes": floating + fp8,
        "fp8_scale_bytes": scales,
    }


def _rank_shape(read) -> tuple[int, ...]:
    """Shape of the rank tensor `read` makes: its stacked source with `index` taken along `dim`."""
    shape = [sum(rows for rows, _ in read.shapes), read.shapes[0][1]]
    if read.index is not None:
        shape[read.dim] = read.index.numel()
    return tuple(shape)


def encoder_bytes(encoder_configs: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Parameters of the vision tower, audio encoder and audio tokenizer (bf16 in the hub; never quantized)."""
    builders = {
        "vision": lambda: MiMoVisionTransformer(VisionConfig.from_dict(encoder_configs["vision"])),
        "audio": lambda: MiMoAudioEncoder(AudioConfig.from_dict(encoder_configs["audio"])),
        "audio_tokenizer": lambda: MiMoAudioTokenizer(
            AudioTokenizerConfig.from_dict(encoder_configs["audio_tokenizer"])
        ),
    }
    out = {}
    for name, build in builders.items():
        module = build_module(build, STORAGE_DTYPE)
        out[f"{name}_params"] = sum(p.numel() for p in module.parameters())
        out[f"{name}_bytes"] = sum(_tensor_bytes(t) for t in module.state_dict().values())
    return out


@dataclasses.dataclass(frozen=True)
class Budget:
    """One GPU's memory and the load asked of it."""

    gpus: int = 8
    gpu_bytes: int = GPU_BYTES
    reserve_bytes: int = RESERVE_BYTES
    sequences: int = 64  # concurrent, one sliding ring each
    context_per_sequence: int = 8192  # what `fits` asks for (EngineConfig.max_model_len's default)
    prefill_chunk: int = 512  # EngineConfig.max_prefill_chunk: sizes the rings
    block_size: int = 16  # EngineConfig.block_size
    num_mtp_layers: int = 3  # MTP layers with KV (num_speculative_tokens)

    def fit(self, weights: int, kv: dict[str, int]) -> dict[str, Any]:
        """Tokens of context (summed over sequences) the full layers' pool holds on a GPU with `weights` once every
        sequence has its ring; `fits` when that covers `sequences` x `context_per_sequence`."""
        kv_room = self.gpu_bytes - self.reserve_bytes - weights
        rings = self.sequences * kv["sliding_bytes_per_sequence"]
        tokens = (kv_room - rings) // kv["full_bytes_per_token"] if kv_room > rings else 0
        return {"weights_per_gpu_bytes": weights, "kv_room_per_gpu_bytes": kv_room, "sliding_rings_bytes": rings,
                "context_tokens": tokens, "fits": tokens >= self.sequences * self.context_per_sequence}


def kv_bytes(config: MiMoV2Config, budget: Budget) -> dict[str, int]:
    """Per GPU: KV bytes per token of context (full layers) and per sequence (the sliding and MTP layers' rings)."""
    specs = kv_layer_specs(rank_config(config, budget.gpus), budget.num_mtp_layers)
    rows_per_step = budget.prefill_chunk + max(0, budget.num_mtp_layers - 1)  # as LLMEngine sizes its rings
    ring = sliding_ring_tokens(config.sliding_attention.sliding_window, rows_per_step)
    block = budget.block_size
    return {
        "full_bytes_per_token": block_bytes(specs, LayerKind.FULL, block, KV_DTYPE) // block,
        "sliding_ring_tokens": ring,
        "sliding_bytes_per_sequence": blocks_for(ring, block) * block_bytes(specs, LayerKind.SLIDING, block, KV_DTYPE),
        "num_full_layers": sum(s.kind is LayerKind.FULL for s in specs),
        "num_sliding_layers": sum(s.kind is LayerKind.SLIDING for s in specs),
        "full_kv_heads_per_gpu": next(s.num_kv_heads for s in specs if s.kind is LayerKind.FULL),
    }


def deployment(model: Model, budget: Budget, ep: int, encoders: dict[str, int], kv: dict) -> dict[str, Any]:
    """Every rank of a `budget.gpus`-way TP deployment (`ep` of them splitting the experts): bytes and KV per GPU."""
    mapping = Mapping.create(budget.gpus, ep)
    mapping.check_model(model.config)
    ranks = [language_rank_bytes(model.config, ParallelRank(mapping, r)) for r in range(budget.gpus)]
    encoder_total = sum(v for k, v in encoders.items() if k.endswith("_bytes"))
    out = {"layout": f"tp{budget.gpus}-ep{ep}", "moe_tp_size": mapping.moe_tp_size, "moe_ep_size": ep,
           "ranks": ranks, "encoders_on_gpu0_bytes": encoder_total, "kv": kv, "dtypes": {}}
    for dtype in ("bf16", "fp8"):
        # the encoders sit on GPU 0 only; every rank holds the same sequences, so the fullest GPU bounds the pool
        out["dtypes"][dtype] = budget.fit(
            max(r[f"{dtype}_bytes"] + (encoder_total if i == 0 else 0) for i, r in enumerate(ranks)), kv
        )
    return out


def even_split(budget: Budget, one_rank: dict[str, int], encoders: dict[str, int], kv: dict) -> dict[str, Any]:
    """The bound: every weight (encoders included) split evenly over the GPUs, nothing replicated."""
    encoder_total = sum(v for k, v in encoders.items() if k.endswith("_bytes"))
    dtypes = {dtype: budget.fit(-(-(one_rank[f"{dtype}_bytes"] + encoder_total) // budget.gpus), kv)
              for dtype in ("bf16", "fp8")}  # fmt: skip
    return {"layout": f"even/{budget.gpus}", "kv": kv, "dtypes": dtypes}


def evaluate(models: list[Model], budget: Budget, eps: list[int]) -> dict[str, Any]:
    results = []
    for model in models:
        one = language_rank_bytes(model.config, ParallelRank(Mapping.create(1)))
        kv = kv_bytes(model.config, budget)
        encoders = encoder_bytes(model.encoder_configs) if model.encoder_configs else {}
        layouts = [even_split(budget, one, encoders, kv), *(deployment(model, budget, ep, encoders, kv) for ep in eps)]
        results.append({
            "model": model.name,
            "language_params": one["params"],
            "reference_params": REFERENCE_PARAMS.get(model.name),
            "encoders": encoders,
            "one_gpu": one,
            "unverified_config_values": model.unverified,
            "layouts": layouts,
        })
    return {**dataclasses.asdict(budget), "kv_dtype": str(KV_DTYPE), "models": results}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"| model | layout | dtype | weights per GPU (GiB) | KV room per GPU (GiB) | tokens of context that fit "
        f"({report['sequences']} sequences) | fits ({report['sequences']} x "
        f"{report['context_per_sequence']:,} tokens) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        for layout in m["layouts"]:
            for dtype, row in layout["dtypes"].items():
                lines.append(
                    f"| {m['model']} | {layout['layout']} | {dtype} | {row['weights_per_gpu_bytes'] / GIB:.1f} | "
                    f"{row['kv_room_per_gpu_bytes'] / GIB:.1f} | {row['context_tokens']:,} | "
                    f"{'yes' if row['fits'] else 'no'} |"
                )
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    lines = []
    for m in report["models"]:
        ref = m["reference_params"]
        ref_text = "" if ref is None else f" (reference {ref / 1e9:,.0f}B: {m['language_params'] / ref - 1:+.1%})"
        encoders = ", ".join(f"{k.removesuffix('_params')} {v / 1e6:,.0f}M" for k, v in m["encoders"].items()
                             if k.endswith("_params"))
        lines.append(f"- {m['model']}: language model + MTP {m['language_params'] / 1e9:,.2f}B parameters{ref_text}"
                     + (f"; encoders {encoders}" if encoders else "; no encoders"))
        kv = m["layouts"][0]["kv"]
        lines.append(f"  KV per GPU: {kv['full_bytes_per_token']:,} B per token of context ({kv['num_full_layers']} "
                     f"full layers x {kv['full_kv_heads_per_gpu']} KV head), {kv['sliding_bytes_per_sequence']:,} B "
                     f"per sequence ({kv['num_sliding_layers']} sliding layers x a {kv['sliding_ring_tokens']}-token "
                     "ring)")
        for key, why in m["unverified_config_values"].items():
            lines.append(f"  unverified: {key}: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    defaults = Budget()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=defaults.gpus)
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 8], help="expert-parallel sizes to lay out")
    parser.add_argument("--gpu-gib", type=float, default=defaults.gpu_bytes / GIB, help="memory of one GPU")
    parser.add_argument("--reserve-gib", type=float, default=defaults.reserve_bytes / GIB,
                        help="per GPU, for CUDA context, NCCL, activations and workspace")
    parser.add_argument("--sequences", type=int, default=defaults.sequences, help="concurrent sequences")
    parser.add_argument("--context", type=int, default=defaults.context_per_sequence,
                        help="tokens of context per sequence that 'fits' asks for")
    parser.add_argument("--prefill-chunk", type=int, default=defaults.prefill_chunk)
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--mtp-kv-layers", type=int, default=defaults.num_mtp_layers,
                        help="MTP layers with KV (num_speculative_tokens)")
    parser.add_argument("--models", nargs="+", choices=("v2.5", "v2.5-pro"), default=["v2.5", "v2.5-pro"])
    parser.add_argument("--layers", type=int, help="V2.5 language-model layers (default: the real 48; for checks)")
    parser.add_argument("--json", type=Path, help="write the report here instead of printing it")
    args = parser.parse_args(argv)
    if args.layers is not None and "v2.5-pro" in args.models:
        parser.error("--layers applies to v2.5 only (V2.5-Pro is built with its 70 layers)")
    budget = Budget(args.gpus, int(args.gpu_gib * GIB), int(args.reserve_gib * GIB), args.sequences, args.context,
                    args.prefill_chunk, args.block_size, args.mtp_kv_layers)
    builders = {"v2.5": lambda: v2_5_model(args.layers), "v2.5-pro": v2_5_pro_model}
    report = evaluate([builders[m]() for m in args.models], budget, args.ep)
    print(summary(report))
    print()
    print(markdown(report))
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print()
        print(text)


if __name__ == "__main__":
    sys.exit(main())
