"""Build each component from a hub checkpoint directory, reading only that component's tensors.

Modules are built on the `meta` device in the target dtype and receive the checkpoint tensors with
`load_state_dict(assign=True)`, so a large model is allocated once, directly on `device`. Strictness (names,
shapes, scale grids, fused layout) lives in `mimo.weights.checkpoint.read_state_dict`.
"""

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mimo.config import MiMoV2Config
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.models.vision_tower import MiMoVisionTransformer, VisionConfig
from mimo.weights.checkpoint import (
    VISION_PREFIXES,
    CheckpointError,
    FusedQKVLayout,
    HubCheckpoint,
    Role,
    read_state_dict,
)
from mimo.weights.fused_qkv import layer_qkv_geometry

CheckpointSource = str | Path | HubCheckpoint


def load_language_model(
    checkpoint: CheckpointSource, dtype: torch.dtype, device: torch.device | str, *, with_mtp: bool = False
) -> MiMoV2ForCausalLM:
    """The language model (`model.*`, `lm_head.*`), plus its MTP layers (`model.mtp.*`) if `with_mtp`.

    No vision or audio tensor is read. Without `with_mtp` the model is built without MTP layers.
    """
    ckpt = _open(checkpoint)
    config = MiMoV2Config.from_pretrained(ckpt.path)
    if not with_mtp:
        config = dataclasses.replace(config, num_nextn_predict_layers=0)
    elif config.num_nextn_predict_layers == 0:
        raise CheckpointError(f"with_mtp=True, but {ckpt.path}/config.json has num_nextn_predict_layers = 0")
    model = build_module(lambda: MiMoV2ForCausalLM(config), dtype)
    roles = (Role.LANGUAGE, Role.MTP) if with_mtp else (Role.LANGUAGE,)
    layout = FusedQKVLayout(config.fused_qkv_tp, functools.partial(layer_qkv_geometry, config))
    return _load(model, ckpt, ckpt.names(*roles), device, qkv_layout=layout)


def load_vision_tower(
    checkpoint: CheckpointSource, dtype: torch.dtype, device: torch.device | str
) -> MiMoVisionTransformer:
    """The vision tower (`visual.*` or `vision_model.*`); no language or audio tensor is read."""
    ckpt = _open(checkpoint)
    config = VisionConfig.from_dict(_sub_config(ckpt, "vision_config"))
    model = build_module(lambda: MiMoVisionTransformer(config), dtype)
    return _load(model, ckpt, ckpt.names(Role.VISION), device, to_module_name=_strip_vision_prefix)


def _strip_vision_prefix(name: str) -> str:
    prefix = next(p for p in VISION_PREFIXES if name.startswith(p))
    return name.removeprefix(prefix)


def _open(checkpoint: CheckpointSource) -> HubCheckpoint:
    return checkpoint if isinstance(checkpoint, HubCheckpoint) else HubCheckpoint(checkpoint)


def _sub_config(ckpt: HubCheckpoint, key: str) -> dict:
    config = MiMoV2Config.from_pretrained(ckpt.path)
    sub = getattr(config, key)
    if sub is None:
        raise CheckpointError(f"{ckpt.path}/config.json has no {key!r}")
    return sub


def build_module(build: Callable[[], nn.Module], dtype: torch.dtype, device: torch.device | str = "meta") -> nn.Module:
    """Run `build()` with `device` and `dtype` as defaults (tensors a module pins to a dtype keep it)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(default_dtype)


def _load(
    model: nn.Module, ckpt: HubCheckpoint, hub_names: list[str], device: torch.device | str, **read_kwargs
) -> nn.Module:
    state = read_state_dict(ckpt, hub_names, model.state_dict(), device=device, **read_kwargs)
    model.load_state_dict(state, strict=True, assign=True)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise CheckpointError(f"{type(model).__name__}: tensors left uninitialised after loading: {on_meta}")
    return model.eval()

