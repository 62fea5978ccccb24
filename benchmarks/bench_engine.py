"""Engine throughput: prefill and decode tokens/s of `LLMEngine`, against the memory-bandwidth bound.

Decode of a MoE model at small batch is bound by reading weights: every step reads the attention, dense-MLP and
LM-head weights once, plus the weights of every expert some token in the batch routed to. This benchmark counts
those bytes from the routing it actually observes, divides by the measured step time, and reports the ratio to the
device-to-device copy bandwidth measured in the same run (the practical HBM limit).

    python benchmarks/bench_engine.py --preset v2.5 --layers 4 --batch-sizes 1,8,32 --prompt-len 512
    python benchmarks/bench_engine.py --checkpoint DIR ...      # a checkpoint instead of random weights
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

import torch

from builders.presets import PRESETS, hub_config
from builders.tiny import random_language_tensors
from mimo.config import MiMoV2Config
from mimo.engine import EngineConfig, LLMEngine, SamplingParams
from mimo.loading import build_module, load_language_model, load_language_weights
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.models.moe import MiMoV2MoE
from mimo.processing.tokenizer_files import write_tiny_tokenizer


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return repeats * 2 * src.numel() / (time.perf_counter() - start)


class ExpertCounter:
    """Records, per MoE layer and forward, how many distinct experts the batch routed to."""

    def __init__(self, model: torch.nn.Module):
        self.distinct: list[int] = []
        self.handles = [
            m.gate.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, MiMoV2MoE)
        ]

    def _hook(self, module, inputs, output):
        _, expert_ids = output  # [T, K]
        self.distinct.append(int(torch.unique(expert_ids).numel()))


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes every decode step reads whatever the routing, bytes of one expert)."""
    def nbytes(module: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    moe_layers = [m for m in model.modules() if isinstance(m, MiMoV2MoE)]
    expert_total = sum(nbytes(m.experts) for m in moe_layers)
    num_experts = sum(len(m.local_experts) for m in moe_layers)
    # an embedding lookup reads rows, not the table
    dense = nbytes(model) - expert_total - nbytes(model.model.embed_tokens)
    return dense, expert_total // max(1, num_experts)


def random_model(preset: str, num_layers: int, device: torch.device) -> MiMoV2ForCausalLM:
    """A preset's geometry with random weights generated on `device` (no checkpoint on disk)."""
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        token_ids = write_tiny_tokenizer(tokenizer_dir)
    hub = hub_config(PRESETS[preset], num_layers=num_layers, token_ids=token_ids, fp8=False, fused_qkv=True)
    # decode never reads the MTP layers; load_language_model leaves them out the same way
    config = dataclasses.replace(MiMoV2Config.from_hf_config(hub), num_nextn_predict_layers=0)
    model = build_module(lambda: MiMoV2ForCausalLM(config), torch.bfloat16)  # meta
    return load_language_weights(model, dict(random_language_tensors(config, seed=0, device=device)), device)


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    if args.checkpoint:
        model = load_language_model(args.checkpoint, dtype=torch.bfloat16, device=device)
    else:
        model = random_model(args.preset, args.layers, device)
    dense_bytes, expert_bytes = weight_bytes(model)
    counter = ExpertCounter(model)
    peak = copy_bandwidth(device)
    vocab = model.config.vocab_size
    results = []
    for batch in args.batch_sizes:
        engine = LLMEngine(model, EngineConfig(
            max_num_seqs=batch, max_num_batched_tokens=max(args.prompt_len, batch), block_size=16,
            max_model_len=args.prompt_len + args.decode_len, kv_cache_memory_bytes=args.kv_gib << 30))
        gen = torch.Generator().manual_seed(batch)
        for i in range(batch):
            prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=args.decode_len, temperature=0.0))
        # prefill: until every request has its first token
        started, t0 = set(), time.perf_counter()
        while len(started) < batch:
            started.update(o.request_id for o in engine.step() if o.new_token_ids)
        torch.cuda.synchronize(device)
        prefill_s = time.perf_counter() - t0
        # decode: steady state, all `batch` sequences decoding one token per step
        counter.distinct.clear()
        steps, t0 = 0, time.perf_counter()
        while engine.has_unfinished():
            engine.step()
            steps += 1
        torch.cuda.synchronize(device)
        decode_s = time.perf_counter() - t0
        moe_layers = sum(model.config.moe_layers)
        experts_per_step = sum(counter.distinct) / max(1, steps)  # summed over layers
        bytes_per_step = dense_bytes + experts_per_step * expert_bytes
        step_s = decode_s / max(1, steps)
        results.append({
            "batch": batch,
            "prompt_len": args.prompt_len,
            "prefill_tok_s": round(batch * args.prompt_len / prefill_s, 1),
            "decode_steps": steps,
            "decode_step_ms": round(step_s * 1e3, 3),
            "decode_tok_s": round(batch / step_s, 1),
            "distinct_experts_per_moe_layer": round(experts_per_step / max(1, moe_layers), 1),
            "weight_GB_per_step": round(bytes_per_step / 1e9, 3),
            "achieved_GB_s": round(bytes_per_step / step_s / 1e9, 1),
            "copy_bandwidth_GB_s": round(peak / 1e9, 1),
            "fraction_of_bandwidth_bound": round(bytes_per_step / step_s / peak, 4),
        })
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="hub checkpoint dir; default: random weights of --preset")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="v2.5")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-len", type=int, default=64)
    parser.add_argument("--kv-gib", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
