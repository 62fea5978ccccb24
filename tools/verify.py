"""Prove a deployment artifact right against its source checkpoint: checksums, every rank's weights, golden logits.

    python -m tools verify --checkpoint HUB --deploy DEPLOY [--device cpu|cuda] [--prompts N] [--atol X]

1. every file's sha256 against the manifest;
2. every rank tensor against its slice of the source, dequantized exactly (the slices the rank's layers state,
   `builders.convert.plan_jobs`): floating tensors must be equal, FP8 ones within one e4m3 rounding (half an ulp of
   3 mantissa bits, or half the subnormal step of their block);
3. logits of a few prompts run at the artifact's TP, one process per rank (gloo on CPU, NCCL on CUDA), against a
   single-process run of the source with the same weight rounding (bf16 artifacts: the source loaded in bf16),
   both computing in float32 (this also catches a slicing rule that step 2 shares with the converter). When every
   weight is exact the logits must agree within --atol; an FP8 artifact with re-quantized blocks (TP below the
   checkpoint's interleave) legitimately differs, so there the logit error is reported and step 2 is the check.
Exits non-zero on any failure. The reference model must fit one device: verify real widths with few layers.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from builders.convert import plan_jobs
from tools.logits import parallel_logits, reference_logits
from mimo.config import MiMoV2Config
from mimo.loading import load_language_model, read_stored
from mimo.parallel.deploy import DeployArtifact, DeployError, rank_file_name
from mimo.weights.checkpoint import SCALE_SUFFIX, HubCheckpoint, Role
from mimo.weights.fp8 import StoredWeight, dequantize_blockwise

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
    weight_errors, failures = check_rank_weights(artifact, checkpoint)
    reference = load_language_model(checkpoint, weight_dtype, device, dequantize_fp8=True).float()
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


def check_rank_weights(artifact: DeployArtifact, checkpoint: str | Path) -> tuple[list[float], list[str]]:
    """|error| of every rank tensor against its slice of the source (dequantized exactly; a floating rank tensor in
    its own dtype's rounding), and the tensors outside the bound (floating: exact; FP8: one e4m3 rounding). Every
    planned rank tensor must be there, and nothing else."""
    ckpt = HubCheckpoint(checkpoint)
    rank_files: dict[tuple[str, int], HubCheckpoint] = {}
    errors, failures = [0.0], []
    expected_names: dict[tuple[str, int], set[str]] = {}
    for job in plan_jobs(ckpt, artifact.config, artifact.mapping, ckpt.names(Role.LANGUAGE, Role.MTP)):
        stored_source = read_stored(dict.fromkeys(job.read.hub_names, ckpt), job.read, "cpu")
        source = StoredWeight(stored_source.dequantized(torch.float32)) if stored_source.is_fp8 else stored_source
        for out in job.outputs:
            key = (out.folder, out.rank)
            if key not in rank_files:
                path = artifact.rank_file(out.folder, out.rank)
                rank_files[key] = HubCheckpoint(path.parent, file=rank_file_name(out.rank))
            expected_names.setdefault(key, set()).add(out.name)
            rank_ckpt, where = rank_files[key], f"{out.folder}/{rank_file_name(out.rank)}:{out.name}"
            if out.name not in rank_ckpt:
                failures.append(f"{where} (missing)")
                continue
            expected = source.select(out.dim, out.index)
            stored = rank_ckpt.tensor(out.name)
            expected = expected.float() if out.name + SCALE_SUFFIX in rank_ckpt else expected.to(stored.dtype).float()
            bound = torch.zeros_like(expected)
            if out.name + SCALE_SUFFIX in rank_ckpt:
                scale_inv = rank_ckpt.tensor(out.name + SCALE_SUFFIX)
                stored = dequantize_blockwise(stored, scale_inv, torch.float32)
                bound = expected.abs() * 2.0**-4 + scale_inv.max() * 2.0**-10
            if stored.shape != expected.shape:
                failures.append(f"{where} (shape {tuple(stored.shape)}, expected {tuple(expected.shape)})")
                continue
            error = (stored.float() - expected).abs()
            errors.append(error.max().item() if error.numel() else 0.0)
            if (error > bound).any():
                failures.append(where)
    for (folder, rank), names in expected_names.items():
        stored = {n for n in rank_files[folder, rank].names() if not n.endswith(SCALE_SUFFIX)}
        extra = sorted(stored - names)
        failures += [f"{folder}/{rank_file_name(rank)}:{n} (belongs to no rank's slice)" for n in extra]
    return errors, failures
