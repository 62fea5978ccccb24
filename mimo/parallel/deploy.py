"""The deployment artifact written by `python -m builders convert` and read by each serving rank.

    DEPLOY/manifest.json              format, source, mapping, dtype; size and sha256 of every file
    DEPLOY/encoder/                   config.json, tokenizer + processor files, model.safetensors (vision + audio
                                      tensors, hub names), audio_tokenizer/: a hub checkpoint without the LM
    DEPLOY/llm/config.json            hub config.json + TensorRT-LLM keys `architecture`, `dtype`, `mapping`,
                                      `quantization`
    DEPLOY/llm/rank{r}.safetensors    rank r's slice of `model.*` / `lm_head.*` (hub names, per-rank shapes)
    DEPLOY/mtp/rank{r}.safetensors    rank r's slice of `model.mtp.*` (checkpoints with MTP layers)

A rank file's `self_attn.qkv_proj.weight` is that rank's `[Q_r; K_r; V_r]` (+ its own 128x128 `weight_scale_inv`
grid for FP8), i.e. a fused qkv_proj interleaved for one rank of the local geometry (`QKVGeometry.local`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mimo.config import MiMoV2Config
from mimo.parallel.mapping import Mapping

DEPLOY_FORMAT = "mimo-triton-deploy"
DEPLOY_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENCODER_DIR = "encoder"
LLM_DIR = "llm"
MTP_DIR = "mtp"
WEIGHT_DTYPES = ("bf16", "fp8")


class DeployError(ValueError):
    """A deployment artifact that is incomplete, corrupt, or used with a layout it was not built for."""


def rank_file_name(rank: int) -> str:
    return f"rank{rank}.safetensors"


def sha256_file(path: Path, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class DeployArtifact:
    path: Path
    manifest: dict
    hub_config: dict  # llm/config.json
    config: MiMoV2Config
    mapping: Mapping
    dtype: str  # "bf16" | "fp8": how FP8 weights of the source are stored

    @classmethod
    def open(cls, path: str | Path) -> DeployArtifact:
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise DeployError(f"{path} is not a deployment artifact: {MANIFEST_FILE} is missing")
        manifest = _read_json(manifest_path)
        if manifest.get("format") != DEPLOY_FORMAT or manifest.get("version") != DEPLOY_VERSION:
            raise DeployError(
                f"{manifest_path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, expected "
                f"{DEPLOY_FORMAT!r} version {DEPLOY_VERSION}"
            )
        hub_config = _read_json(path / LLM_DIR / "config.json")
        mapping = Mapping.from_dict(hub_config.get("mapping") or {}, f"{path / LLM_DIR / 'config.json'}")
        if mapping.to_dict() != manifest.get("mapping"):
            raise DeployError(
                f"{path}: llm/config.json mapping {mapping.to_dict()} != manifest {manifest.get('mapping')}"
            )
        if manifest.get("dtype") not in WEIGHT_DTYPES:
            raise DeployError(f"{manifest_path}: dtype {manifest.get('dtype')!r}, expected one of {WEIGHT_DTYPES}")
        return cls(path, manifest, hub_config, MiMoV2Config.from_hf_config(hub_config), mapping, manifest["dtype"])

    def check_layout(self, world_size: int, tp_size: int | None = None) -> None:
        """Raise DeployError unless the artifact was built for this many ranks (and this TP, if given)."""
        if world_size != self.mapping.world_size or (tp_size is not None and tp_size != self.mapping.tp_size):
            asked = f"world size {world_size}" + ("" if tp_size is None else f", tp {tp_size}")
            raise DeployError(
                f"{self.path} was converted for world size {self.mapping.world_size} (tp {self.mapping.tp_size}, "
                f"moe_ep {self.mapping.moe_ep_size}); it is being run with {asked}. "
                f"Convert again with --tp {tp_size or world_size}"
            )

    def rank_file(self, folder: str, rank: int) -> Path:
        """`folder/rank{rank}.safetensors`, after checking its size against the manifest (a truncated copy fails)."""
        if not 0 <= rank < self.mapping.world_size:
            raise DeployError(f"rank {rank} is outside the artifact's world size {self.mapping.world_size}")
        relative = f"{folder}/{rank_file_name(rank)}"
        self.check_size(relative)
        return self.path / relative

    def check_size(self, relative: str) -> None:
        entry = self.manifest.get("files", {}).get(relative)
        if entry is None:
            raise DeployError(f"{self.path / MANIFEST_FILE} lists no file {relative}")
        file = self.path / relative
        size = file.stat().st_size if file.is_file() else None
        if size != entry["bytes"]:
            raise DeployError(
                f"{file} is {'missing' if size is None else f'{size} bytes'}, the manifest says {entry['bytes']} bytes "
                "(truncated or replaced; convert again)"
            )

    def verify_checksums(self) -> None:
        """Raise DeployError naming every file whose sha256 differs from the manifest."""
        bad = []
        for relative, entry in sorted(self.manifest["files"].items()):
            self.check_size(relative)
            if sha256_file(self.path / relative) != entry["sha256"]:
                bad.append(relative)
        if bad:
            raise DeployError(f"{self.path}: sha256 mismatch for {bad}")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DeployError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise DeployError(f"{path} must hold a JSON object")
    return value
