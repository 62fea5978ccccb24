"""Engine throughput: prefill and decode tokens/s of `LLMEngine`, against the memory-bandwidth bound, with the
decode CUDA graphs off and on; with `--speculative-tokens K`, the cost of MTP speculative decoding and its tokens/s
as a function of the accept rate.

Decode of a MoE model at small batch is bound by reading memory: every step reads the attention, dense-MLP and
LM-head weights once, the weights of every expert some token in the batch routed to, and the KV each sequence
attends (its whole context in full layers, the window in sliding ones). This benchmark counts those bytes, the
experts from the routing it observes, divides by the measured step time, and reports the ratio to the
device-to-device copy bandwidth measured in the same run (the practical HBM limit).

Per batch and prompt length one engine (graphs captured at its start) prefills the prompts once, then decodes
`--decode-len` steps eagerly (`cuda_graphs: 0`, the graphs set aside) and `--decode-len` steps replaying them
(`cuda_graphs: 1`). Routing is observed through forward hooks on the routers, and in a graph replay through the
router outputs the hooks kept while the graph was captured (`ExpertCounter.follow_graphs`): each phase counts the
experts of its own steps, and the KV bytes follow each phase's own contexts.

MTP rows (one per `--accept-rates` value): the plain run's greedy tokens are replayed as drafts by the engine's
test-only override (`ReplayDrafts`), each draft kept with the given probability and made wrong otherwise, so the
accept rate is chosen, not the random weights' (which accept almost nothing); the tokens stay the plain run's. A
decode step is then one verify forward (1 + K tokens per sequence, `verify_ms`) plus the K MTP layer passes
(`draft_ms`: CUDA events around each MTP pass, no added synchronisation; `verify_ms` is the rest of the step);
`plain_decode_step_ms` is the one-token decode step of the same batch; `draft_passes_replayed` says how many MTP
passes ran as drafting graphs.

    python -m benchmarks.bench_engine --preset v2.5 --layers 4 --batch-sizes 1,8,64 --prompt-lens 512,4096
    python -m benchmarks.bench_engine --preset v2.5 --layers 4 --batch-sizes 1,8 --speculative-tokens 3 \
        --accept-rates 0,0.5,0.7,0.9,1
    python -m benchmarks.bench_engine --preset v2.5 --layers 4 --batch-sizes 1,8,64 --fp8   # FP8 weights as stored
    python -m benchmarks.bench_engine --preset v2.5 --layers 4 --batch-sizes 1,8 --profile  # kernels + host per step
    python -m benchmarks.bench_engine --checkpoint DIR ...      # a checkpoint instead of random weights
    python -m benchmarks.bench_engine --preset tiny --device cpu ...   # a smoke run (CPU numbers mean nothing)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import tempfile
import time

import torch

from builders.presets import PRESETS, hub_config
from builders.tiny import language_hub_tensors, random_language_tensors
from mimo.config import MiMoV2Config
from mimo.engine import EngineConfig, LLMEngine, SamplingParams
from mimo.engine.cuda_graphs import DecodeGraphs
from mimo.engine.kv_cache import LayerKind
from mimo.engine.speculative import ReplayDrafts
from mimo.loading import build_module, load_language_model, load_language_weights
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.models.moe import MiMoV2MoE
from mimo.processing.tokenizer_files import write_tiny_tokenizer

from benchmarks.limits import copy_bandwidth, gemm_rate, synchronize


class ExpertCounter:
    """Records, per MoE layer and forward, which experts the batch routed to; the distinct ones are counted after the
    timed run (counting inside the forward would synchronise the device in every MoE layer of every step)."""

    def __init__(self, model: torch.nn.Module):
        self.routed: list[torch.Tensor] = []
        self.handles = [
            m.gate.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, MiMoV2MoE)
        ]

    def _hook(self, module, inputs, output):
        _, expert_ids = output  # [T, K], a fresh tensor every forward
        self.routed.append(expert_ids)

    def distinct(self, last: int) -> list[int]:
        """Distinct experts of each of the `last` recorded forwards."""
        return [int(torch.unique(ids).numel()) for ids in self.routed[len(self.routed) - last:]]

    def follow_graphs(self) -> None:
        """Counts decode-graph replays too. The hooks run while a graph is captured, and the router outputs they
        keep are then the graph's own tensors (held, so never reused by its pool), which every replay overwrites:
        after each replay their real rows are copied into `routed` (on the device, no sync)."""
        captured: dict[tuple[int, int, int], list[torch.Tensor]] = {}
        forward, replay = DecodeGraphs._forward, DecodeGraphs.replay

        def capturing_forward(graphs, q, bucket):
            start = len(self.routed)
            outputs = forward(graphs, q, bucket)
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                captured[(id(graphs), q, bucket)] = self.routed[start:]
            return outputs

        def counting_replay(graphs, step):
            outputs = replay(graphs, step)
            tensors = captured.get((id(graphs), step.query_len, step.bucket))
            if tensors is not None:
                self.routed += [ids[:step.num_seqs * step.query_len].clone() for ids in tensors]
            return outputs

        DecodeGraphs._forward, DecodeGraphs.replay = capturing_forward, counting_replay


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes every decode step reads whatever the routing, bytes of one expert)."""
    def nbytes(module: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    moe_layers = [m for m in model.modules() if isinstance(m, MiMoV2MoE)]
    expert_total = sum(nbytes(m.experts) for m in moe_layers)
    num_experts = sum(len(m.local_experts) for m in moe_layers)
    # an embedding lookup reads rows, not the table (unless the LM head is tied to it); a plain decode step does not
    # run the MTP layers
    mtp = 0 if model.model.mtp is None else nbytes(model.model.mtp)
    embedding = 0 if model.lm_head is None else nbytes(model.model.embed_tokens)
    dense = nbytes(model) - expert_total - embedding - mtp
    return dense, expert_total // max(1, num_experts)


def kv_bytes(engine: LLMEngine, contexts: list[int]) -> int:
    """KV bytes one decode step reads for sequences whose queries see `contexts` keys (query position + 1): full
    layers every key, sliding layers the query and its window."""
    kv_cache = engine.runner.kv_cache
    window = engine.runner.sliding_window
    total = 0
    for spec in kv_cache.specs[:engine.runner.model.config.num_hidden_layers]:  # the MTP layers do not run
        per_token = spec.num_kv_heads * (spec.head_dim + spec.v_head_dim) * kv_cache.k[0].element_size()
        keys = sum(min(c, window + 1) if spec.kind is LayerKind.SLIDING else c for c in contexts)
        total += keys * per_token
    return total


PROFILE_STEPS = 3  # with --profile: steps of each phase under torch.profiler, then as many under cProfile


def prefill_flops(model: MiMoV2ForCausalLM, prompt_len: int) -> float:
    """FLOPs of prefilling one prompt: 2 x the parameters each token uses (attention projections, dense MLPs, routers,
    its top-k experts) for every token, the LM head for the last one, and attention's 2 x heads x (q/k + v head
    dims) per key a query sees (causal; sliding layers: the query and its window)."""
    config = model.config
    moe_layers = [m for m in model.model.layers.modules() if isinstance(m, MiMoV2MoE)]
    expert_params = sum(p.numel() for m in moe_layers for p in m.experts.parameters())
    per_expert = expert_params / max(1, sum(len(m.local_experts) for m in moe_layers))
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    active = layer_params - expert_params + len(moe_layers) * config.num_experts_per_tok * per_expert
    flops = 2 * prompt_len * active + 2 * config.vocab_size * config.hidden_size
    for layer_type in config.layer_types:
        spec = config.attention_spec(layer_type)
        visible = prompt_len if spec.sliding_window is None else min(prompt_len, spec.sliding_window + 1)
        keys = visible * (visible + 1) // 2 + (prompt_len - visible) * visible  # query i sees min(i + 1, visible)
        flops += 2 * spec.num_heads * (spec.head_dim + spec.v_head_dim) * keys
    return flops


def device_profile(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


def print_kernels(prof, count: int, title: str, per: str, top: int) -> None:
    """The profiled device kernels, the most expensive first, each per `per` (one of `count`)."""
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels) / count
    print(f"# profile {title} {total / 1e3:.3f} ms per {per} over {count}", flush=True)
    for event in sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:top]:
        each = event.self_device_time_total / count
        print(f"#   {each:9.1f} us  {100 * each / max(total, 1e-9):5.1f}%  x{event.count // count:<4d} "
              f"{event.key[:110]}", flush=True)


def print_host_ops(prof, title: str, top: int = 15) -> None:
    """The profiled host operations with the most self time (where a stall outside the kernels sits)."""
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    print(f"# host ops {title}", flush=True)
    for event in ops:
        print(f"#   {event.self_cpu_time_total / 1e3:9.2f} ms self  x{event.count:<5d} {event.key[:110]}", flush=True)


def prefill_again(engine: LLMEngine, prompts: dict[str, list[int]], device: torch.device, temperature: float,
                  tag: str, max_tokens: int = 1) -> float:
    """One more prefill of `prompts` as requests of their own (ids + `tag`) of `max_tokens` tokens, run to their
    end: the prefill's seconds (the engine has no prefix cache: the same work as the first time)."""
    seconds, _ = prefill(engine, {f"{request_id}-{tag}": prompt for request_id, prompt in prompts.items()},
                         max_tokens, device, temperature)  # fmt: skip
    while engine.has_unfinished():
        engine.step()
    return seconds


def profile_prefill(engine: LLMEngine, prompts: dict[str, list[int]], device: torch.device, temperature: float,
                    label: str, top: int = 18) -> None:
    """Device time per kernel over one more prefill of `prompts`, and the wall time of that prefill: the share of
    it the device was busy."""
    with device_profile(device) as prof:
        seconds = prefill_again(engine, prompts, device, temperature, "profiled")
    print(f"# prefill {label}: {1e3 * seconds:.2f} ms wall under the profiler", flush=True)
    print_kernels(prof, 1, f"prefill {label}: device time", "prefill", top)


def profile_steps(engine: LLMEngine, generated: dict[str, list[int]], steps: int, device: torch.device,
                  label: str, top: int = 18) -> None:
    """Device time per kernel over `steps` decode steps (torch.profiler; kernels replayed from a graph included),
    then the host's Python functions over `steps` more (cProfile), each per step, the most expensive first."""
    import cProfile
    import pstats

    with device_profile(device) as prof:
        decode(engine, generated, steps, device)
    print_kernels(prof, steps, f"{label}: device time", "step", top)
    host = cProfile.Profile()
    start = time.perf_counter()
    host.runcall(decode, engine, generated, steps, device)
    print(f"# host {label}: {1e3 * (time.perf_counter() - start) / steps:.3f} ms per step under cProfile; "
          "own time per step:", flush=True)
    stats = pstats.Stats(host)
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    for (filename, line, name), (_, calls, own, cumulative, _) in rows:
        print(f"#   {1e3 * own / steps:8.3f} ms own  {1e3 * cumulative / steps:8.3f} ms cum  x{calls // steps:<5d} "
              f"{filename.rsplit('/', 2)[-1]}:{line} {name}", flush=True)


def random_model(preset: str, num_layers: int, device: torch.device, with_mtp: bool,
                 fp8: bool = False) -> MiMoV2ForCausalLM:
    """A preset's geometry with random weights generated on `device` (no checkpoint on disk); `fp8`: quantized per
    128x128 block as the hub's FP8 checkpoints are, and served as stored."""
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        token_ids = write_tiny_tokenizer(tokenizer_dir)
    hub = hub_config(PRESETS[preset], num_layers=num_layers, token_ids=token_ids, fp8=fp8, fused_qkv=True)
    config = MiMoV2Config.from_hf_config(hub)
    if not with_mtp:  # plain decode never reads the MTP layers; load_language_model leaves them out the same way
        config = dataclasses.replace(config, num_nextn_predict_layers=0)
    model = build_module(lambda: MiMoV2ForCausalLM(config), torch.bfloat16)  # meta
    tensors = random_language_tensors(config, seed=0, device=device)
    if fp8:  # split q/k/v, each with its own grid (load_language_weights reads split names)
        tensors = language_hub_tensors(dataclasses.replace(config, fused_qkv_tp=None), tensors, fp8=True)
    return load_language_weights(model, dict(tensors), device)


class Spans:
    """Wraps `owner.method` (an instance attribute shadows the class's) to time each call without adding a
    synchronisation: CUDA events around it on the current stream (the device's span from the call's first work to
    its last, host gaps inside included), read after the run; on the CPU, the call's wall time."""

    def __init__(self, owner, method: str, device: torch.device):
        self._events, self._seconds = [], []
        wrapped = getattr(owner, method)

        def run(*args, **kwargs):
            if device.type != "cuda":
                start = time.perf_counter()
                result = wrapped(*args, **kwargs)
                self._seconds.append(time.perf_counter() - start)
                return result
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = wrapped(*args, **kwargs)
            end.record()
            self._events.append((start, end))
            return result

        setattr(owner, method, run)

    def seconds(self) -> list[float]:
        """Each call's seconds so far, oldest first (synchronises on the last event)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += [start.elapsed_time(end) / 1e3 for start, end in self._events]
            self._events.clear()
        return self._seconds


def prefill_and_decode(engine: LLMEngine, prompts: dict[str, list[int]], max_tokens: int, device: torch.device,
                       temperature: float = 0.0) -> tuple[float, float, int, dict[str, list[int]]]:
    """(prefill s until every request has its first token, decode s after that, decode steps, tokens per request)."""
    prefill_s, generated = prefill(engine, prompts, max_tokens, device, temperature)
    decode_s, steps = decode(engine, generated, None, device)
    return prefill_s, decode_s, steps, generated


def prefill(engine: LLMEngine, prompts: dict[str, list[int]], max_tokens: int, device: torch.device,
            temperature: float = 0.0) -> tuple[float, dict[str, list[int]]]:
    """Adds the requests (greedy, or sampling at `temperature` from the engine's seeded stream: one noise draw for
    the batch, where per-request seeds would draw row by row) and steps until each has its first token: (seconds,
    tokens per request so far)."""
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=temperature))
    generated: dict[str, list[int]] = {request_id: [] for request_id in prompts}
    t0 = time.perf_counter()
    while not all(generated.values()):
        step(engine, generated)
    seconds = time.perf_counter() - t0  # the first tokens are on the host: not the device work queued after them
    synchronize(device)
    return seconds, generated


def decode(engine: LLMEngine, generated: dict[str, list[int]], max_steps: int | None,
           device: torch.device) -> tuple[float, int]:
    """Steps until the requests finish or `max_steps` steps ran: (seconds, steps)."""
    steps, t0 = 0, time.perf_counter()
    while engine.has_unfinished() and (max_steps is None or steps < max_steps):
        step(engine, generated)
        steps += 1
    synchronize(device)
    return time.perf_counter() - t0, steps


def step(engine: LLMEngine, generated: dict[str, list[int]]) -> None:
    for output in engine.step():
        generated[output.request_id] += output.new_token_ids


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    k = args.speculative_tokens
    if args.checkpoint:
        model = load_language_model(args.checkpoint, dtype=torch.bfloat16, device=device, with_mtp=k > 0)
    else:
        model = random_model(args.preset, args.layers, device, with_mtp=k > 0, fp8=args.fp8)
    dense_bytes, expert_bytes = weight_bytes(model)
    counter = ExpertCounter(model)
    counter.follow_graphs()
    peak = copy_bandwidth(device, nbytes=args.copy_bytes)
    rate = gemm_rate(device) if device.type == "cuda" else None  # a CPU smoke run has no GEMM rate to divide by
    vocab = model.config.vocab_size
    moe_layers = sum(model.config.moe_layers)
    results = []

    def engine(batch: int, prompt_len: int, max_len: int, num_speculative_tokens: int = 0,
               override=None) -> LLMEngine:
        return LLMEngine(model, EngineConfig(
            max_num_seqs=batch, max_num_batched_tokens=max(prompt_len, batch * (1 + num_speculative_tokens)),
            block_size=16, max_model_len=max_len, kv_cache_memory_bytes=args.kv_gib << 30,
            num_speculative_tokens=num_speculative_tokens, seed=0,
            overlap_steps=args.overlap_steps if not num_speculative_tokens else 0), test_draft_override=override)

    def release() -> None:  # the KV pools and graph pools of engines no longer referenced
        gc.collect()
        synchronize(device)
        torch.cuda.empty_cache() if device.type == "cuda" else None

    for prompt_len in args.prompt_lens:
        # first calls (allocator, kernels) stay out of the rows: the plain warm-up engine is made as the graph rows'
        # engines are (max_model_len included) and samples as they do
        max_len = prompt_len + 2 * (args.decode_len + 2 * PROFILE_STEPS) + 3
        warmup = {"warmup": list(range(prompt_len))}
        prefill_and_decode(engine(1, prompt_len, max_len), warmup, 4, device, args.temperature)
        if k:
            prefill_and_decode(engine(1, prompt_len, prompt_len + 4, k, ReplayDrafts({}, vocab)), warmup, 4, device,
                               args.temperature)
        release()
        for batch in args.batch_sizes:
            gen = torch.Generator().manual_seed(batch)
            prompts = {f"r{i}": torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for i in range(batch)}
            results += graph_rows(args, engine(batch, prompt_len, max_len), prompts, counter, dense_bytes,
                                  expert_bytes, moe_layers, peak, batch * prefill_flops(model, prompt_len) / rate if rate else None,
                                  device)
            release()
            if not k:
                continue
            plain = engine(batch, prompt_len, prompt_len + args.decode_len)
            _, decode_s, _, generated = prefill_and_decode(plain, prompts, args.decode_len, device)
            del plain
            release()
            results += speculative_rows(args, engine, vocab, prompts, generated, decode_s, device)
    return results


def graph_rows(args, engine: LLMEngine, prompts: dict[str, list[int]], counter: ExpertCounter, dense_bytes: int,
               expert_bytes: int, moe_layers: int, peak: float, prefill_bound_s: float | None,
               device: torch.device) -> list[dict]:
    """One prefill, then `decode_len` eager decode steps and `decode_len` graph steps (each phase after one untimed
    step: a graph's first replay uploads it): a row for each phase. `prefill_bound_s`: the prefill's FLOPs at the
    bf16 GEMM rate. With `--profile`, PROFILE_STEPS more steps of each phase under the profiler."""
    batch, prompt_len, decode_len = len(prompts), len(next(iter(prompts.values()))), args.decode_len
    runner = engine.runner
    graphs, runner.graphs = runner.graphs, None
    # Untimed: the rows' prompts once, and two eager decode steps after them. The warm-up engine decoded through
    # graphs only, so the eager decode kernels compile at their first launch: that launch was the step an
    # overlapped engine queues ahead of the prefill's first token, 0.7-1.9 s inside the timed prefill of a
    # machine's first process (later processes load the kernels from Triton's disk cache).
    untimed_prefill_s = prefill_again(engine, prompts, device, args.temperature, "warmup", max_tokens=3)
    runner.graphs = graphs  # timed as served: the step queued ahead of the first token is a graph's
    compiles = dict(torch._dynamo.utils.counters["stats"])
    with device_profile(device) if args.profile_timed_prefill else contextlib.nullcontext() as prof:
        prefill_s, generated = prefill(engine, prompts, 2 * (decode_len + 2 * PROFILE_STEPS + 1) + 1, device,
                                       args.temperature)
    runner.graphs = None  # the eager phase first
    if prof is not None:
        compiled = {k: v - compiles.get(k, 0) for k, v in torch._dynamo.utils.counters["stats"].items()}
        print_host_ops(prof, f"timed prefill batch {batch} prompt {prompt_len}, {1e3 * prefill_s:.1f} ms wall; "
                             f"dynamo stats during it {compiled}")
    rows = []
    for phase in ("eager", "graphs"):
        if phase == "graphs":
            if graphs is None:
                print(json.dumps({"batch": batch, "prompt_len": prompt_len, "cuda_graphs": "off: they need a "
                                  "single-rank CUDA engine with the Triton kernels"}), flush=True)
                break
            runner.graphs = graphs
            replays = graphs.replays
        decode(engine, generated, 1, device)
        # the query of the next step attends the prompt and every generated token (the last one fed now)
        first_context = prompt_len + len(next(iter(generated.values())))
        counter.routed.clear()
        decode_s, steps = decode(engine, generated, decode_len, device)
        if args.profile:
            profile_steps(engine, generated, PROFILE_STEPS, device, f"batch {batch} prompt {prompt_len} {phase}")
        experts_per_step = sum(counter.distinct(steps * moe_layers)) / max(1, steps)  # summed over layers
        contexts = [first_context + j for j in range(steps)]
        kv_per_step = kv_bytes(engine, [c for c in contexts for _ in range(batch)]) / max(1, steps)
        weights_per_step = dense_bytes + experts_per_step * expert_bytes
        bytes_per_step = weights_per_step + kv_per_step
        step_s = decode_s / max(1, steps)
        rows.append({
            "batch": batch,
            "prompt_len": prompt_len,
            "cuda_graphs": int(phase == "graphs"),
            "overlap_steps": int(engine.overlap),
            "prefill_tok_s": round(batch * prompt_len / prefill_s, 1),
            "untimed_prefill_s_before": round(untimed_prefill_s, 4),
            "prefill_fraction_of_gemm_rate": round(prefill_bound_s / prefill_s, 4) if prefill_bound_s else None,
            "decode_steps": steps,
            "graph_steps": graphs.replays - replays if phase == "graphs" else 0,
            "mean_context": round(sum(contexts) / max(1, steps)),
            "decode_step_ms": round(step_s * 1e3, 3),
            "decode_tok_s": round(batch / step_s, 1),
            "distinct_experts_per_moe_layer": round(experts_per_step / max(1, moe_layers), 1),
            "weight_GB_per_step": round(weights_per_step / 1e9, 3),
            "kv_GB_per_step": round(kv_per_step / 1e9, 4),
            "achieved_GB_s": round(bytes_per_step / step_s / 1e9, 1),
            "copy_bandwidth_GB_s": round(peak / 1e9, 1),
            "fraction_of_bandwidth_bound": round(bytes_per_step / step_s / peak, 4),
        })
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) == 2:
        rows[1]["speedup_vs_eager"] = round(rows[0]["decode_step_ms"] / rows[1]["decode_step_ms"], 3)
        print(json.dumps({"batch": batch, "prompt_len": prompt_len, "speedup_vs_eager": rows[1]["speedup_vs_eager"]}),
              flush=True)
    for request_id in prompts:
        engine.abort(request_id)
    engine.step()
    if args.profile:
        profile_prefill(engine, prompts, device, args.temperature, f"batch {batch} prompt {prompt_len}")
    return rows


def speculative_rows(args, engine, vocab: int, prompts: dict[str, list[int]], generated: dict[str, list[int]],
                     decode_s: float, device: torch.device) -> list[dict]:
    """One row per `--accept-rates` value: MTP decode with the plain run's tokens replayed as drafts; `engine`
    makes an engine (batch, prompt_len, max_model_len, k, override), `decode_s` is the plain run's decode time."""
    k, rows = args.speculative_tokens, []
    batch, prompt_len = len(prompts), len(next(iter(prompts.values())))
    steps = len(next(iter(generated.values()))) - 1
    step_s = decode_s / max(1, steps)
    decoded = sum(len(tokens) - 1 for tokens in generated.values())  # after each request's first token
    recorded = {rid: prompts[rid] + tokens for rid, tokens in generated.items()}
    for accept_rate in args.accept_rates:
        spec = engine(batch, prompt_len, prompt_len + args.decode_len, k,
                      ReplayDrafts(recorded, vocab, accept_rate, seed=batch))
        drafter = spec.runner.drafter
        draft_spans = Spans(drafter, "step", device)
        _, spec_decode_s, spec_steps, spec_generated = prefill_and_decode(spec, prompts, args.decode_len, device)
        draft_s = draft_spans.seconds()
        # bf16 verify rows (1 + k query tokens) may flip a near-tied argmax of the plain run (1 query token): from
        # there on the replayed drafts miss, which the measured acceptance shows; the row says it happened
        diverged = sum(spec_generated[rid] != tokens for rid, tokens in generated.items())
        stats = spec.speculative_stats()
        decode_draft_s = sum(draft_s[-spec_steps:])
        rows.append({
            "batch": batch,
            "prompt_len": prompt_len,
            "speculative_tokens": k,
            "override_accept_rate": accept_rate,  # test-only override: not the model's own accept rate
            "sequences_diverged_from_plain_run": diverged,
            "acceptance_rate": round(stats["accepted_tokens"] / max(1, stats["draft_tokens"]), 3),
            "accept_length": round(1 + stats["accepted_tokens"] / max(1, stats["verifications"]), 3),
            "decode_steps": spec_steps,
            "decode_step_ms": round(spec_decode_s / spec_steps * 1e3, 3),
            "verify_ms": round((spec_decode_s - decode_draft_s) / spec_steps * 1e3, 3),
            "draft_ms": round(decode_draft_s / spec_steps * 1e3, 3),
            "draft_passes_replayed": f"{drafter.graphs.replays if drafter.graphs else 0} of {len(draft_s)}",
            "plain_decode_step_ms": round(step_s * 1e3, 3),
            "decode_tok_s": round(decoded / spec_decode_s, 1),
            "plain_decode_tok_s": round(decoded / decode_s, 1),
            "speedup": round(decode_s / spec_decode_s, 3),
        })
        print(json.dumps(rows[-1]), flush=True)
        del spec
        gc.collect()
        if args.profile:  # the same requests again (their drafts replayed the same way) on an engine of their own
            again = {f"{rid}-profiled": prompt for rid, prompt in prompts.items()}
            spec = engine(batch, prompt_len, prompt_len + args.decode_len, k,
                          ReplayDrafts({f"{rid}-profiled": tokens for rid, tokens in recorded.items()}, vocab,
                                       accept_rate, seed=batch))  # fmt: skip
            _, profiled = prefill(spec, again, args.decode_len, device)
            decode(spec, profiled, 1, device)  # a graph's first replay uploads it
            profile_steps(spec, profiled, PROFILE_STEPS, device,
                          f"MTP k {k} batch {batch} prompt {prompt_len} override rate {accept_rate}")
            del spec
            gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="hub checkpoint dir; default: random weights of --preset")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="v2.5")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--prompt-lens", "--prompt-len", type=lambda s: [int(x) for x in s.split(",")], default=[512],
                        help="prompt lengths, one set of rows each")
    parser.add_argument("--decode-len", type=int, default=64)
    parser.add_argument("--kv-gib", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--fp8", action="store_true", help="random weights FP8 e4m3 per 128x128 block, served as "
                                                           "stored (the bytes per step count them as such)")
    parser.add_argument("--copy-bytes", type=int, default=2 << 30, help="bytes of the bandwidth probe's copy")
    parser.add_argument("--speculative-tokens", type=int, default=0, help="MTP drafts per step (0: plain rows only)")
    parser.add_argument("--overlap-steps", type=int, choices=(0, 1), default=None,
                        help="EngineConfig.overlap_steps of the plain rows (default: the engine's, on for CUDA)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="plain rows sample at this temperature (0: greedy, whose tokens "
                             "collapse into repeats on random weights, so later steps route to fewer experts than "
                             "the eager phase counted)")
    parser.add_argument("--profile", action="store_true", help=f"print each phase's kernels over {PROFILE_STEPS} more steps")
    parser.add_argument("--profile-timed-prefill", action="store_true",
                        help="the host operations of each row's timed prefill, under the profiler")
    parser.add_argument("--accept-rates", type=lambda s: [float(x) for x in s.split(",")], default=[0, 0.5, 0.8, 1],
                        help="draft accept probabilities of the test-only override, one MTP row each")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
