"""Decode CUDA graphs on a CUDA device: captured graphs replayed against the eager forward on fresh random inputs.

* every graph step of a whole engine run, compared with the eager forward of the same chunks: logits within bf16
  rounding and the same greedy token wherever the eager logits' top two are further apart than the two paths
  differ; at V2.5 widths (one full dense layer, one sliding MoE layer with sinks, window 128) and on the tiny model;
* whole runs with graphs on and off emit identical greedy tokens (float32, where the two paths agree to 1e-5):
  32 decode steps at batch 1, 3 and 8 (3 pads up to bucket 4; the batch shrinks as requests finish), contexts
  past the sliding window, and MTP verify steps of 1 + 2 tokens;
* the MTP drafting graphs at V2.5 widths against the eager drafter on one replayed trajectory (k = 1, 3).

    pytest -q -s tests/test_cuda_graphs_gpu.py    # on the GPU machine; the errors are printed with -s
"""


import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graph replay: needs a CUDA device (run on the GPU machine)"
)
pytest.importorskip("triton", reason="the decode graphs run the Triton kernels")

from hf_reference import randomize_weights, tiny_hub_config  # noqa: E402

from mimo.config import MiMoV2Config  # noqa: E402
from mimo.engine import EngineConfig, LLMEngine, SamplingParams, generate  # noqa: E402
from mimo.engine.speculative import ReplayDrafts  # noqa: E402
from mimo.models.language_model import MiMoV2ForCausalLM  # noqa: E402
from benchmarks import bench_engine  # noqa: E402

CUDA = torch.device("cuda")

BATCHES = [1, 3, 8]
DECODE_STEPS = 32


def tiny(dtype: torch.dtype) -> MiMoV2ForCausalLM:
    # full and sliding layers (sinks on sliding ones), window 8 in blocks of 4, dense + MoE layers, 3 MTP layers
    model = MiMoV2ForCausalLM(MiMoV2Config.from_hf_config(tiny_hub_config(num_nextn_predict_layers=3)))
    randomize_weights(model, seed=0)
    return model.requires_grad_(False).eval().to(CUDA, dtype)


@pytest.fixture(scope="module")
def tiny_fp32() -> MiMoV2ForCausalLM:
    return tiny(torch.float32)


@pytest.fixture(scope="module")
def tiny_bf16() -> MiMoV2ForCausalLM:
    return tiny(torch.bfloat16)


@pytest.fixture(scope="module")
def v25() -> MiMoV2ForCausalLM:
    model = bench_engine.random_model("v2.5", 2, CUDA, with_mtp=False)  # layer 0 full + dense, 1 sliding + MoE
    assert list(model.config.layer_types) == ["full", "sliding"] and list(model.config.moe_layers) == [False, True]
    yield model
    del model
    torch.cuda.empty_cache()


def requests(batch: int, vocab: int, prompt_lens: list[int], seed: int) -> tuple[list[list[int]], list]:
    """`batch` fresh random prompts (lengths cycling through `prompt_lens`) and greedy params whose max_tokens
    differ, so that the batch shrinks over the run (and changes bucket) while the longest decodes 32 steps."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (prompt_lens[i % len(prompt_lens)],), generator=generator).tolist()
               for i in range(batch)]
    params = [SamplingParams(max_tokens=DECODE_STEPS + 1 - 5 * (i % 3), temperature=0.0) for i in range(batch)]
    return prompts, params


def engine_for(model, graphs: bool, max_prefill_chunk: int, override=None, **overrides) -> LLMEngine:
    """Buckets 1, 2, 4, 8; prefill chunks of `max_prefill_chunk`, which sizes the sliding rings (window + chunk):
    contexts past the window wrap them."""
    config = dict(max_num_seqs=8, max_num_batched_tokens=4096, max_prefill_chunk=max_prefill_chunk, block_size=16,
                  max_model_len=1024, num_full_blocks=1024, seed=0, cuda_graphs=int(graphs))
    engine = LLMEngine(model, EngineConfig(**config | overrides), test_draft_override=override)
    graphs_ = engine.runner.graphs
    assert (graphs_ is not None) is graphs, "graphs must be on for a single-rank CUDA engine with cuda_graphs=1"
    if graphs:
        assert len(graphs_._graphs) == len(graphs_.buckets) * len(graphs_.query_lens)  # really captured
    return engine


def compare_every_graph_step(engine: LLMEngine, prompts, params, rel_tol: float) -> list[int]:
    """Runs the requests; at each graph step also runs the eager forward of the same chunks and compares. Returns
    the buckets compared."""
    runner = engine.runner
    forward, buckets, errors = runner.forward, [], []  # errors: relative, per token of every graph step

    def both(inputs):
        hidden, logits = forward(inputs)
        if inputs.graph is None:
            return hidden, logits
        logits = logits.clone()  # the eager forward below must not be what is compared
        _, eager = forward(runner.prepare(inputs.chunks, allow_graph=False, fed=inputs.fed))
        assert torch.isfinite(logits).all()
        # per token: top-8 routing over random bf16 weights can flip a near-tie between two correct kernels, and a
        # flipped token then differs by design; a wrong KV row, position or pad misses on most tokens (checked below)
        errors.extend((logits.double() - eager.double()).norm(dim=-1).div(eager.double().norm(dim=-1)).tolist())
        # the greedy token is the eager one wherever the eager top two are further apart than the paths differ
        top2 = eager.topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1]) > 2 * (logits - eager).abs().max(dim=-1).values
        assert torch.equal(logits.argmax(-1)[decided], eager.argmax(-1)[decided])
        buckets.append(inputs.graph.bucket)
        return hidden, logits

    runner.forward = both
    generate(engine, prompts, params)
    close = sum(e < rel_tol for e in errors)
    print(f"{close} of {len(errors)} tokens within {rel_tol:.0e} over {len(buckets)} graph steps; worst "
          f"{max(errors):.2e}; above: {sorted(f'{e:.1e}' for e in errors if e >= rel_tol)}")
    assert close >= 0.9 * len(errors)
    return buckets


@pytest.mark.parametrize("batch", BATCHES)
def test_v25_widths_replay_matches_eager_bf16(v25, batch):
    # contexts from 100 (decode crosses the 128-token window) to 300 tokens, rings of 128 + 64 tokens
    prompts, params = requests(batch, v25.config.vocab_size, [100, 300, 170], seed=batch)
    buckets = compare_every_graph_step(engine_for(v25, True, 64), prompts, params, rel_tol=2e-2)
    assert len(buckets) >= DECODE_STEPS - 4 and max(buckets) == {1: 1, 3: 4, 8: 8}[batch]


@pytest.mark.parametrize("batch", BATCHES)
def test_tiny_replay_matches_eager_bf16(tiny_bf16, batch):
    # window 8, rings of 8 + 8 tokens: every sequence wraps its ring many times
    prompts, params = requests(batch, tiny_bf16.config.vocab_size, [5, 19, 12], seed=10 + batch)
    buckets = compare_every_graph_step(engine_for(tiny_bf16, True, 8), prompts, params, rel_tol=2e-2)
    assert len(buckets) >= DECODE_STEPS - 3 and max(buckets) == {1: 1, 3: 4, 8: 8}[batch]


@pytest.mark.parametrize("batch", BATCHES)
def test_greedy_tokens_with_graphs_equal_eager(tiny_fp32, batch):
    prompts, params = requests(batch, tiny_fp32.config.vocab_size, [5, 19, 12], seed=20 + batch)
    eager = generate(engine_for(tiny_fp32, False, 8), prompts, params)
    engine = engine_for(tiny_fp32, True, 8)
    assert generate(engine, prompts, params) == eager
    assert engine.runner.graphs.replays >= DECODE_STEPS - 3


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_overlapped_steps_emit_the_tokens_of_steps_in_turn(tiny_fp32, graphs):
    """Overlap on the GPU (steps really launched before the host reads the tokens they follow): greedy and seeded
    sampled tokens equal those of the same engine stepping in turn."""
    prompts, params = requests(8, tiny_fp32.config.vocab_size, [5, 19, 12], seed=50)
    params = [p if i % 2 else SamplingParams(max_tokens=p.max_tokens, temperature=0.8, top_k=40, seed=i)
              for i, p in enumerate(params)]
    in_turn = generate(engine_for(tiny_fp32, graphs, 8, overlap_steps=0), prompts, params)
    engine = engine_for(tiny_fp32, graphs, 8, overlap_steps=1)
    fed_steps, prepare = [], engine.runner.prepare

    def counting(chunks, allow_graph=True, fed=None):
        fed_steps.append(fed is not None)
        return prepare(chunks, allow_graph, fed)

    engine.runner.prepare = counting
    assert generate(engine, prompts, params) == in_turn
    assert sum(fed_steps) >= DECODE_STEPS - 8
    if graphs:
        assert engine.runner.graphs.replays >= DECODE_STEPS - 3


def test_mtp_verify_steps_replay_graphs(tiny_fp32):
    prompts, params = requests(8, tiny_fp32.config.vocab_size, [5, 19, 12], seed=30)
    eager = generate(engine_for(tiny_fp32, False, 8), prompts, params)
    recorded = {f"generate-{i}": p + t for i, (p, t) in enumerate(zip(prompts, eager))}
    override = ReplayDrafts(recorded, tiny_fp32.config.vocab_size, 0.7)
    engine = engine_for(tiny_fp32, True, 8, override, num_speculative_tokens=2)
    graphs = engine.runner.graphs
    assert graphs.query_lens == (1, 3)
    steps = []
    replay = graphs.replay
    graphs.replay = lambda step: steps.append(step.query_len) or replay(step)
    assert generate(engine, prompts, params) == eager
    assert 3 in steps


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_decode_step_never_waits_for_the_device(tiny_bf16, graphs):
    """A decode step's input preparation and forward, eager or through a graph, make no host synchronisation
    (CUDA's sync debug mode turns one into an error); only sampling reads the tokens back afterwards."""
    engine = engine_for(tiny_bf16, graphs, 8)
    runner = engine.runner
    prepare, forward, checked = runner.prepare, runner.forward, []

    def guarded(method):
        def run(*args, **kwargs):
            chunks = args[0] if isinstance(args[0], list) else args[0].chunks
            if not all(c.num_tokens == 1 and c.start >= c.seq.num_prompt_tokens for c in chunks):
                return method(*args, **kwargs)
            torch.cuda.set_sync_debug_mode("error")
            try:
                result = method(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            checked.append(method.__name__)
            return result
        return run

    runner.prepare, runner.forward = guarded(prepare), guarded(forward)
    prompts, params = requests(3, tiny_bf16.config.vocab_size, [5, 19, 12], seed=40)
    generate(engine, prompts, params)
    assert checked.count("forward") >= DECODE_STEPS - 3


class RecordingReplay(ReplayDrafts):
    """ReplayDrafts that also keeps the drafts the MTP layers proposed: the replayed drafts fix the trajectory, so
    the drafting graphs and the eager drafter see the same states at every pass and their own drafts compare."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.proposed: list[tuple[str, int, list[int]]] = []

    def __call__(self, request_id, token_ids, drafts):
        self.proposed.append((request_id, len(token_ids), list(drafts)))
        return super().__call__(request_id, token_ids, drafts)


@pytest.mark.parametrize("k", [1, 3])
def test_v25_drafting_graphs_propose_the_eager_drafts_bf16(k):
    """MTP layers at V2.5 widths (bf16): through the drafting graphs and eagerly, on one replayed trajectory (accept
    rate 0.6, batch 8 shrinking): the same drafts wherever bf16 rounding leaves the argmax decided (>= 95% of them),
    the same tokens, and most decode passes (no prompt token) replayed."""
    model = bench_engine.random_model("v2.5", 2, CUDA, with_mtp=True)
    try:
        prompts, params = requests(8, model.config.vocab_size, [100, 300, 170], seed=40 + k)
        plain = generate(engine_for(model, True, 64), prompts, params)
        recorded = {f"generate-{i}": p + t for i, (p, t) in enumerate(zip(prompts, plain))}
        runs = {}
        for graphs in (False, True):
            override = RecordingReplay(recorded, model.config.vocab_size, 0.6, seed=k)
            engine = engine_for(model, True, 64, override, num_speculative_tokens=k)
            drafter = engine.runner.drafter
            if not graphs:
                drafter.graphs = None
            step, decode_passes = drafter.step, [0]

            def counted(chunks, *args):
                decode_passes[0] += all(c.start >= c.seq.num_prompt_tokens for c in chunks)
                return step(chunks, *args)

            drafter.step = counted
            runs[graphs] = (generate(engine, prompts, params), override.proposed, drafter.graphs, decode_passes[0])
        (eager_tokens, eager_drafts, _, _), (graph_tokens, graph_drafts, draft_graphs, passes) = runs[False], runs[True]
        assert graph_tokens == eager_tokens
        assert [(r, n) for r, n, _ in graph_drafts] == [(r, n) for r, n, _ in eager_drafts]
        same = sum(a == b for (_, _, x), (_, _, y) in zip(graph_drafts, eager_drafts) for a, b in zip(x, y))
        total = sum(len(x) for _, _, x in eager_drafts)
        print(f"k={k}: {same}/{total} drafts equal, {draft_graphs.replays} of {passes} decode passes replayed")
        assert same >= 0.95 * total
        assert draft_graphs.replays >= passes // 2
    finally:
        del model
        torch.cuda.empty_cache()
