"""Write a complete random-weight hub checkpoint (tiny, or real V2.5 widths with N layers).

    python -m builders tiny --out DIR [--fp8] [--preset tiny|v2.5] [--layers N] [--seed S] [--layout fused|split]

The directory is what a MiMo-V2.5 download looks like: config.json (hub schema), generation_config.json,
tokenizer files, sharded safetensors + index (language, MTP, `visual.`, `audio_encoder.` tensors) and the
`audio_tokenizer/` folder. `--layout fused` is the V2.5 format (TP-interleaved qkv_proj, per-shard FP8 grids
under --fp8); `--layout split` is the Flash-style split q/k/v variant of the same weights.
"""

import argparse
import itertools
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from builders.presets import PRESETS, Preset, hub_config
from mimo.config import MiMoV2Config
from mimo.loading import AUDIO_TOKENIZER_DIR, build_module, language_model_reads
from mimo.models.audio_tokenizer import AudioTokenizerConfig, MiMoAudioTokenizer
from mimo.models.audio_tower import AudioConfig, MiMoAudioEncoder
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.models.vision_tower import MiMoVisionTransformer, VisionConfig
from mimo.processing.tokenizer_files import write_tiny_tokenizer
from mimo.weights.checkpoint import AUDIO_MODULE_PREFIX, SPLIT_QKV_SUFFIXES, VISION_PREFIX, atomic_directory
from mimo.weights.fp8 import quantize_blockwise
from mimo.weights.fused_qkv import fuse_interleaved, layer_qkv_geometry, quantize_interleaved
from mimo.weights.safetensors_writer import write_shards

# Block-FP8 in the hub checkpoints: attention q/k/v (or fused qkv) and every MLP / expert projection. Norms,
# embeddings, lm_head, router, o_proj, sinks and MTP eh_proj stay floating (ref §2.1, §2.2).
FP8_SUFFIXES = (
    ".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".qkv_proj.weight",
    ".gate_proj.weight", ".up_proj.weight", ".down_proj.weight",
)
STORAGE_DTYPE = torch.bfloat16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to (re)create")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="language-model layers (default: the preset's)")
    parser.add_argument("--fp8", action="store_true", help="128x128 block FP8 e4m3 weights + quantization_config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("fused", "split"), default="fused")


def run(args: argparse.Namespace) -> None:
    out = build_checkpoint(
        args.out, preset=args.preset, num_layers=args.layers, fp8=args.fp8, seed=args.seed, layout=args.layout
    )
    print(f"wrote {out}")


def build_checkpoint(
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    num_layers: int | None = None,
    fp8: bool = False,
    seed: int = 0,
    layout: str = "fused",
) -> Path:
    """Write the checkpoint atomically into `out_dir`; the same seed gives the same weights in both layouts."""
    if layout not in ("fused", "split"):
        raise ValueError(f"layout={layout!r}: expected 'fused' or 'split'")
    spec: Preset = PRESETS[preset]
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        token_ids = write_tiny_tokenizer(tmp)
        config_dict = hub_config(
            spec, num_layers=num_layers or spec.num_layers, token_ids=token_ids, fp8=fp8, fused_qkv=layout == "fused"
        )
        config = MiMoV2Config.from_hf_config(config_dict)
        torch.manual_seed(seed)
        vision = build_module(lambda: MiMoVisionTransformer(VisionConfig.from_dict(config.vision_config)),
                              STORAGE_DTYPE, "cpu")
        audio = build_module(lambda: MiMoAudioEncoder(AudioConfig.from_dict(config.audio_config)), STORAGE_DTYPE, "cpu")
        tensors = itertools.chain(
            language_hub_tensors(config, random_language_tensors(config, seed), fp8=fp8),
            ((f"{VISION_PREFIX}{n}", t) for n, t in vision.state_dict().items()),
            ((f"{AUDIO_MODULE_PREFIX}{n}", t) for n, t in audio.state_dict().items()),
        )
        write_shards(tmp, tensors, spec.max_shard_bytes)  # streamed: memory stays at one shard

        tokenizer_dir = tmp / AUDIO_TOKENIZER_DIR
        tokenizer_dir.mkdir()
        tokenizer_config = AudioTokenizerConfig.from_dict(spec.audio_tokenizer_config)
        audio_tokenizer = build_module(lambda: MiMoAudioTokenizer(tokenizer_config), STORAGE_DTYPE, "cpu")
        save_file(audio_tokenizer.state_dict(), tokenizer_dir / "model.safetensors", metadata={"format": "pt"})
        _write_json(tokenizer_dir / "config.json", spec.audio_tokenizer_config)
        _write_json(tmp / "config.json", config_dict)
        _write_json(
            tmp / "generation_config.json",
            {"eos_token_id": token_ids["eos_token_id"], "pad_token_id": token_ids["pad_token_id"]},
        )
    return out_dir


def random_language_tensors(
    config: MiMoV2Config, seed: int, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Split hub-named (q/k/v, gate/up, per-expert) random LM + MTP weights in module order, one tensor at a time.

    Matrices ~ N(0, 1/fan_in) (about 0.016 at hidden 4096) keep activations O(1) and logits clearly non-uniform;
    embeddings ~ N(0, 1), norms 1, non-zero sinks and router correction bias (so expert selection differs from
    the plain sigmoid ranking).
    """
    model = build_module(lambda: MiMoV2ForCausalLM(config), torch.float32)  # meta: the split hub names + shapes
    reads = language_model_reads(model, fused_qkv_tp=None, rank_files=False)
    generator = torch.Generator(device).manual_seed(seed)
    for name, shape in ((name, shape) for read in reads for name, shape in zip(read.hub_names, read.shapes)):
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=STORAGE_DTYPE, device=device)
            continue
        noise = torch.randn(shape, generator=generator, device=device)
        if name.endswith("e_score_correction_bias"):
            yield name, 0.1 * noise  # float32, as sglang keeps it
        elif len(shape) == 2 and "embed_tokens" not in name:
            yield name, (noise / math.sqrt(shape[1])).to(STORAGE_DTYPE)
        else:  # embeddings, sink logits
            yield name, noise.to(STORAGE_DTYPE)


def language_hub_tensors(
    config: MiMoV2Config, tensors: Iterable[tuple[str, torch.Tensor]], *, fp8: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical LM tensors -> hub tensors: fused interleaved qkv_proj if the config says so, FP8 where released."""
    ckpt_tp = config.fused_qkv_tp
    pending_qkv: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if ckpt_tp is not None and name.endswith(SPLIT_QKV_SUFFIXES):
            pending_qkv[name] = tensor
            prefix = name.removesuffix(name.split(".")[-2] + ".weight")  # ... .self_attn.
            parts = [f"{prefix}{p}_proj.weight" for p in "qkv"]
            if not all(part in pending_qkv for part in parts):
                continue
            geometry = layer_qkv_geometry(config, name)
            name = f"{prefix}qkv_proj.weight"
            tensor = fuse_interleaved(*(pending_qkv.pop(part) for part in parts), geometry, ckpt_tp)
            if fp8:
                weight, scale_inv = quantize_interleaved(tensor, geometry, ckpt_tp, name=name)
                yield from ((name, weight), (name + "_scale_inv", scale_inv))
                continue
        elif fp8 and name.endswith(FP8_SUFFIXES):
            weight, scale_inv = quantize_blockwise(tensor)
            yield from ((name, weight), (name + "_scale_inv", scale_inv))
            continue
        yield name, tensor
    if pending_qkv:
        raise ValueError(f"q/k/v projections without their siblings: {sorted(pending_qkv)}")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
