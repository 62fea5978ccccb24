"""Logits of a language model for one token sequence (float32, whole sequence from position 0, no KV cache).

    python -m tools logits --checkpoint DIR --input-ids IDS.npy --out LOGITS.npy [--device cpu]
    python -m tools logits --deploy DEPLOY --tp N --input-ids IDS.npy --out LOGITS.npy [--device cpu|cuda]

`--checkpoint` reads only config.json and the language-role tensors of a hub checkpoint. `--deploy` runs a
deployment artifact (python -m builders convert) as it is served: N processes, one per rank, each loading only its
rank files (gloo on CPU, NCCL on CUDA with rank r on cuda:r); N must be the artifact's tensor-parallel size.
Writes float32 logits [T, vocab] for a 1-D int id array.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mimo.loading import load_language_model, load_rank_language_model
from mimo.models.attention import NoCacheAttention
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.parallel.deploy import DeployArtifact
from mimo.parallel.distributed import RankContext, spawn_ranks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="hub checkpoint directory")
    source.add_argument("--deploy", type=Path, help="deployment artifact, run with one process per rank")
    parser.add_argument("--tp", type=int, default=None, help="with --deploy: its tensor-parallel size")
    parser.add_argument("--input-ids", type=Path, required=True, help=".npy file with a 1-D integer id array")
    parser.add_argument("--out", type=Path, required=True, help=".npy file for float32 logits [T, vocab]")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> None:
    input_ids = read_input_ids(args.input_ids)
    if args.deploy is not None:
        (logits,) = parallel_logits(args.deploy, [input_ids.tolist()], torch.device(args.device).type, tp=args.tp)
    elif args.tp is not None:
        raise SystemExit("--tp runs a deployment artifact: convert the checkpoint (python -m builders convert) and "
                         "pass --deploy")  # fmt: skip
    else:
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


def parallel_logits(
    deploy: str | Path,
    prompts: list[list[int]],
    device_type: str,
    dtype: torch.dtype = torch.float32,
    *,
    tp: int | None = None,
) -> list[torch.Tensor]:
    """float32 logits `[len(prompt), vocab]` of each prompt (whole sequence from position 0), on CPU.

    Spawns `mapping.world_size` processes (gloo on CPU, NCCL on CUDA, rank r on cuda:r); rank 0 reports.
    `tp`, if given, must be the artifact's tensor-parallel size (DeployError otherwise).
    """
    artifact = DeployArtifact.open(deploy)
    if tp is not None:
        artifact.check_layout(tp, tp)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.safetensors"
        spawn_ranks(
            _logits_worker, artifact.mapping.world_size, device_type, str(artifact.path), prompts, str(out), dtype
        )
        with safe_open(out, framework="pt") as f:
            return [f.get_tensor(f"prompt.{i}") for i in range(len(prompts))]


def _logits_worker(ctx: RankContext, deploy: str, prompts: list[list[int]], out: str, dtype: torch.dtype) -> None:
    model = load_rank_language_model(deploy, ctx.rank, ctx.world_size, dtype, ctx.device, group=ctx.group)
    logits = {
        f"prompt.{i}": reference_logits(model, torch.tensor(ids, device=ctx.device)).cpu()
        for i, ids in enumerate(prompts)
    }
    if ctx.rank == 0:
        save_file(logits, out)
