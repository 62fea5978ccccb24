"""Prove a deployment artifact right against its source checkpoint: checksums, every rank's weights, golden logits.

    python -m builders verify --checkpoint HUB --deploy DEPLOY [--device cpu|cuda] [--prompts N] [--atol X]

1. every file's sha256 against the manifest;
2. every rank tensor against the same slice of the source, taken independently of the converter (canonical q/k/v
   from `read_state_dict`, sharded by `shard_qkv_for_rank` / `rank_split`): floating tensors must be equal, FP8
   ones within one e4m3 rounding (half an ulp of 3 mantissa bits, or half the subnormal step of their block);
3. logits of a few prompts run at the artifact's TP, one process per rank (gloo on CPU, NCCL on CUDA), against a
   single-process run of the source with the same weight rounding (bf16 artifacts: the source loaded in bf16),
   both computing in float32. When every weight is exact the logits must agree within --atol; an FP8 artifact with
   re-quantized blocks (TP below the checkpoint's interleave) legitimately differs, so there the logit error is
   reported and step 2 is the check.
Exits non-zero on any failure. The reference model must fit one device: verify real widths with few layers.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from builders.logits import parallel_logits, reference_logits
from mimo.config import MiMoV2Config
from mimo.loading import load_language_model
from mimo.parallel.deploy import LLM_DIR, MTP_DIR, DeployArtifact, DeployError, rank_file_name
from mimo.parallel.mapping import rank_split
from mimo.weights.checkpoint import SCALE_SUFFIX, HubCheckpoint
from mimo.weights.fp8 import dequantize_blockwise
from mimo.weights.fused_qkv import layer_qkv_geometry, shard_qkv_for_rank

PROMPT_LENGTHS = (3, 17, 64, 129)  # below, at and beyond a sliding window; prompt 0 ends in a 1-token decode-like row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="the hub checkpoint DEPLOY was converted from")
    parser.add_argument("--deploy", type=Path, required=True, help="deployment artifact (python -m builders convert)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=len(PROMPT_LENGTHS), help="number of random-token prompts")
    parser.add_argument("--atol", type=float, default=1e-4, help="max |logit error| when all weights are exact")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> None:
    report = verify(
        args.checkpoint, args.deploy, device=args.device, num_prompts=args.prompts, atol=args.atol, seed=args.seed
    )
    print(report.summary())
    if not report.passed:
        sys.exit(1)


@dataclasses.dataclass
class VerifyReport:
    world_size: int
    device: str
    weights_exact: bool
    max_weight_error: float  # max |dequantized rank tensor - source slice|
    weight_failures: list[str]  # tensors outside the bound
    max_logit_error: float
    per_prompt_logit_error: list[float]
    logit_scale: float  # max |reference logit|
    atol: float

    @property
    def logits_checked(self) -> bool:
        return self.weights_exact

    @property
    def passed(self) -> bool:
        return not self.weight_failures and (not self.logits_checked or self.max_logit_error <= self.atol)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        logit_rule = f"<= atol {self.atol:g}" if self.logits_checked else "informational: FP8 blocks re-quantized"
        lines = [
            f"{verdict}: {self.world_size} ranks on {self.device}",
            f"  weights: max |error| {self.max_weight_error:.3g} "
            f"({'exact' if self.weights_exact else 'within e4m3 bound'}"
            f"{'' if not self.weight_failures else f'; OUT OF BOUND: {self.weight_failures[:5]}'})",
            f"  logits: max |error| {self.max_logit_error:.3g} ({logit_rule}); per prompt "
            f"{[float(f'{e:.3g}') for e in self.per_prompt_logit_error]}; max |logit| {self.logit_scale:.3g}",
        ]
        return "\n".join(lines)


def verification_prompts(vocab_size: int, count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)] for i in range(count)]
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def verify(
    checkpoint: str | Path,
    deploy: str | Path,
    *,
    device: str = "cpu",
    num_prompts: int = 4,
    atol: float = 1e-4,
    seed: int = 0,
) -> VerifyReport:
    artifact = DeployArtifact.open(deploy)
    artifact.verify_checksums()
    source_config = MiMoV2Config.from_pretrained(checkpoint)
    if dataclasses.replace(source_config, quantization=None) != dataclasses.replace(artifact.config, quantization=None):
        raise DeployError(f"{artifact.path} was not converted from {checkpoint}: their language-model configs differ")
    prompts = verification_prompts(source_config.vocab_size, num_prompts, seed)
    # The ranks run first, so this process has not initialised CUDA when they start.
    logits = parallel_logits(artifact.path, prompts, device)

    # Weights as the artifact rounds them: bf16 artifacts hold dequantized FP8 / bf16 weights exactly as bf16.
    weight_dtype = torch.bfloat16 if artifact.dtype == "bf16" else torch.float32
    reference = load_language_model(
        checkpoint, weight_dtype, device, with_mtp=source_config.num_nextn_predict_layers > 0
    )
    weight_errors, failures = check_rank_weights(artifact, reference.state_dict())
    reference.float()
    reference_logits_ = [reference_logits(reference, torch.tensor(ids, device=device)).cpu() for ids in prompts]
    per_prompt = [(a - b).abs().max().item() for a, b in zip(logits, reference_logits_, strict=True)]
    return VerifyReport(
        world_size=artifact.mapping.world_size,
        device=device,
        weights_exact=max(weight_errors) == 0.0,
        max_weight_error=max(weight_errors),
        weight_failures=failures,
        max_logit_error=max(per_prompt),
        per_prompt_logit_error=per_prompt,
        logit_scale=max(r.abs().max().item() for r in reference_logits_),
        atol=atol,
    )


def check_rank_weights(artifact: DeployArtifact, source: dict[str, torch.Tensor]) -> tuple[list[float], list[str]]:
    """|error| of every rank tensor against its slice of `source` (a canonical LM + MTP state_dict), and the
    tensors outside the bound (floating: exact; FP8: one e4m3 rounding)."""
    config, mapping = artifact.config, artifact.mapping
    folders = (LLM_DIR, MTP_DIR) if config.num_nextn_predict_layers else (LLM_DIR,)
    errors, failures = [0.0], []
    for rank in range(mapping.world_size):
        for folder in folders:
            rank_file = artifact.rank_file(folder, rank)
            ckpt = HubCheckpoint(rank_file.parent, file=rank_file_name(rank))
            for name in ckpt.names():
                if name.endswith(SCALE_SUFFIX):
                    continue
                expected = _source_slice(name, source, config, mapping, rank).float()
                stored = ckpt.tensor(name)
                bound = torch.zeros_like(expected)
                if name + SCALE_SUFFIX in ckpt:
                    scale_inv = ckpt.tensor(name + SCALE_SUFFIX)
                    stored = dequantize_blockwise(stored, scale_inv, torch.float32)
                    bound = expected.abs() * 2.0**-4 + scale_inv.max() * 2.0**-10
                error = (stored.float().to(expected.device) - expected).abs()
                errors.append(error.max().item() if error.numel() else 0.0)
                if (error > bound.to(expected.device)).any():
                    failures.append(f"{folder}/{rank_file_name(rank)}:{name}")
    return errors, failures


def _source_slice(name: str, source: dict[str, torch.Tensor], config: MiMoV2Config, mapping, rank: int) -> torch.Tensor:
    if name.endswith("self_attn.qkv_proj.weight"):
        prefix = name.removesuffix("qkv_proj.weight")
        q, k, v = (source[f"{prefix}{p}_proj.weight"] for p in "qkv")
        return shard_qkv_for_rank(q, k, v, layer_qkv_geometry(config, name), mapping.tp_size, rank)
    split = rank_split(name, config, mapping, rank)
    if split is None:
        raise DeployError(f"rank {rank} holds {name!r}, which belongs to another rank")
    tensor = source[name]
    return tensor.index_select(split.dim, split.positions(tensor.shape[split.dim]).to(tensor.device))
