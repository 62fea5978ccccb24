"""Build each component from a hub checkpoint directory, reading only that component's tensors.

Modules are built on the `meta` device in the target dtype and receive the checkpoint tensors with
`load_state_dict(assign=True)`, so a large model is allocated once, directly on `device`. Strictness (names,
shapes, scale grids, fused layout) lives in `mimo.weights.checkpoint.read_state_dict`.
"""

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mimo.config import MiMoV2Config
from mimo.models.audio_tokenizer import AudioTokenizerConfig, MiMoAudioTokenizer
from mimo.models.audio_tower import AudioConfig, MiMoAudioEncoder
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.models.vision_tower import MiMoVisionTransformer, VisionConfig
from mimo.weights.checkpoint import (
    AUDIO_MODULE_PREFIX,
    VISION_PREFIXES,
    CheckpointError,
    FusedQKVLayout,
    HubCheckpoint,
    Role,
    read_state_dict,
)
from mimo.weights.fused_qkv import layer_qkv_geometry

CheckpointSource = str | Path | HubCheckpoint
AUDIO_TOKENIZER_DIR = "audio_tokenizer"


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


def load_audio_encoder(
    checkpoint: CheckpointSource, dtype: torch.dtype, device: torch.device | str
) -> MiMoAudioEncoder:
    """The audio tower of the main checkpoint (`audio_encoder.*` / `*speech_embeddings*`); reads no other role."""
    ckpt = _open(checkpoint)
    config = AudioConfig.from_dict(_sub_config(ckpt, "audio_config"))
    model = build_module(lambda: MiMoAudioEncoder(config), dtype)
    return _load(
        model, ckpt, ckpt.names(Role.AUDIO), device, to_module_name=lambda n: n.removeprefix(AUDIO_MODULE_PREFIX)
    )


def load_audio_tokenizer(
    checkpoint_dir: str | Path, dtype: torch.dtype, device: torch.device | str
) -> MiMoAudioTokenizer:
    """The audio tokenizer from its own folder `audio_tokenizer/{config.json,model.safetensors}` (ref §2.5)."""
    folder = Path(checkpoint_dir) / AUDIO_TOKENIZER_DIR
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist")
    config = AudioTokenizerConfig.from_dict(json.loads(config_path.read_text()))
    model = build_module(lambda: MiMoAudioTokenizer(config), dtype)
    ckpt = HubCheckpoint(folder)
    return _load(model, ckpt, ckpt.names(), device)


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
    """Run `build()` with `device` and `dtype` as defaults (tensors a module pins to a dtype keep it).

    The default dtype is process-wide: build modules from one thread at a time.
    """
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

