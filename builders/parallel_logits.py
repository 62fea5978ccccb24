"""Logits of a deployment artifact, computed the way it is served: one process per rank of its mapping."""

import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from builders.logits import reference_logits
from mimo.parallel.deploy import DeployArtifact
from mimo.parallel.distributed import RankContext, spawn_ranks
from mimo.parallel.loading import load_rank_language_model


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
