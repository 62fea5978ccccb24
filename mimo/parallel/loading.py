"""Load rank r's part of the language model from a deployment artifact: its rank files only, strictly."""

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from mimo.loading import build_module
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.parallel.deploy import LLM_DIR, MTP_DIR, DeployArtifact, DeployError, rank_file_name
from mimo.parallel.mapping import rank_geometry
from mimo.parallel.transform import shard_language_model
from mimo.weights.checkpoint import MTP_PREFIX, FusedQKVLayout, HubCheckpoint, read_state_dict
from mimo.weights.fused_qkv import layer_qkv_geometry


def load_rank_language_model(
    deploy: str | Path | DeployArtifact,
    rank: int,
    world_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    group: dist.ProcessGroup | None = None,
    with_mtp: bool = False,
) -> MiMoV2ForCausalLM:
    """Rank `rank`'s language model (+ MTP layers if `with_mtp`), reading only `llm/` (and `mtp/`) rank files.

    Raises DeployError when the artifact was built for another world size or a rank file is truncated, and
    CheckpointError when a rank file does not hold exactly this rank's tensors in this rank's shapes.
    """
    artifact = deploy if isinstance(deploy, DeployArtifact) else DeployArtifact.open(deploy)
    artifact.check_layout(world_size)
    config = artifact.config
    if not with_mtp:
        config = dataclasses.replace(config, num_nextn_predict_layers=0)
    elif config.num_nextn_predict_layers == 0:
        raise DeployError(f"with_mtp=True, but {artifact.path} has no MTP layers")
    model = build_module(lambda: MiMoV2ForCausalLM(config), dtype)
    shard_language_model(model, artifact.mapping, rank, group)
    tp = artifact.mapping.tp_size
    # A rank file's qkv_proj is [Q_r; K_r; V_r]: a fused projection interleaved at 1 for the local geometry.
    layout = FusedQKVLayout(1, lambda name: rank_geometry(layer_qkv_geometry(config, name), tp))
    expected = model.state_dict()
    state = {}
    for folder in (LLM_DIR, MTP_DIR) if with_mtp else (LLM_DIR,):
        rank_file = artifact.rank_file(folder, rank)
        ckpt = HubCheckpoint(rank_file.parent, file=rank_file_name(rank))
        part = {name: t for name, t in expected.items() if name.startswith(MTP_PREFIX) == (folder == MTP_DIR)}
        state.update(read_state_dict(ckpt, ckpt.names(), part, device=device, qkv_layout=layout))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
