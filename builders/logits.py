"""Reference logits of a checkpoint's language model for one token sequence (float32, no KV cache).

    python -m builders logits --checkpoint DIR --input-ids IDS.npy --out LOGITS.npy [--device cpu]

Reads only config.json and the language-role tensors; writes float32 logits [T, vocab] for a 1-D int id array.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from mimo.loading import load_language_model
from mimo.models.attention import NoCacheAttention
from mimo.models.language_model import MiMoV2ForCausalLM


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="hub checkpoint directory")
    parser.add_argument("--input-ids", type=Path, required=True, help=".npy file with a 1-D integer id array")
    parser.add_argument("--out", type=Path, required=True, help=".npy file for float32 logits [T, vocab]")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> None:
    input_ids = read_input_ids(args.input_ids)
    model = load_language_model(args.checkpoint, torch.float32, args.device)
    logits = reference_logits(model, torch.from_numpy(input_ids).to(args.device))
    np.save(args.out, logits.cpu().numpy())
    print(f"wrote {args.out}: logits {tuple(logits.shape)}")


def read_input_ids(path: Path) -> np.ndarray:
    ids = np.load(path, allow_pickle=False)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path}: expected a non-empty 1-D integer array, found dtype {ids.dtype} shape {ids.shape}")
    return ids.astype(np.int64)


@torch.inference_mode()
def reference_logits(model: MiMoV2ForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [T] -> float32 logits [T, vocab] of the whole sequence from position 0."""
    num_tokens = input_ids.shape[0]
    positions = torch.arange(num_tokens, device=input_ids.device)
    hidden = model(positions, NoCacheAttention([num_tokens]), model.embed(input_ids))  # [T, H]
    return model.compute_logits(hidden)
