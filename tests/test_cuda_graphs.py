"""Decode CUDA graphs (`mimo.engine.cuda_graphs`) on the CPU: bucket choice, which steps a graph runs, padding, and
the static-input forward a graph captures.

The CPU has no CUDA graphs, so an engine there runs eagerly whatever `cuda_graphs` says. `DecodeGraphs` on a CPU
device runs the very forward it would capture, from its static inputs, eagerly at every replay; with the Triton
kernels under the interpreter (conftest sets TRITON_INTERPRET=1) the tests below run that path through a whole
engine (padded buckets, sequences leaving the batch, sliding rings wrapped, preemption, MTP verify steps) and
compare its greedy tokens and logits with the eager path's. On a machine with CUDA the same tests run on the GPU,
where they replay captured graphs; tests/test_cuda_graphs_gpu.py adds bf16 and V2.5 widths there.
"""

import contextlib
import copy
import inspect
import os


import pytest
import torch
from hf_reference import randomize_weights, tiny_hub_config

from mimo.config import MiMoV2Config
from mimo.engine import EngineConfig, LLMEngine, SamplingParams, generate
from mimo.engine import engine as engine_module
from mimo.engine.cuda_graphs import bucket_for, decode_query_len, graph_buckets, graphs_unavailable
from mimo.engine.kv_cache import LayerKind
from mimo.engine.scheduler import ScheduledChunk
from mimo.engine.sequence import Sequence
from mimo.engine.speculative import ReplayDrafts
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.models.moe import MiMoV2MoE

pytest.importorskip("triton", reason="the static-input forward runs the Triton kernels (interpreter on the CPU)")

pytestmark = pytest.mark.usefixtures("single_torch_thread")
CPU = torch.device("cpu")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_buckets_are_powers_of_two_then_max_num_seqs():
    assert graph_buckets(1) == [1]
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    buckets = graph_buckets(48)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]
    assert bucket_for(49, buckets) is None


def chunk(prompt_len: int, generated: int, num_tokens: int, num_drafts: int = 0) -> ScheduledChunk:
    seq = Sequence("r", list(range(prompt_len)), SamplingParams(), None, None)
    seq.token_ids += [7] * generated
    seq.num_computed_tokens = prompt_len + generated - (num_tokens - num_drafts)
    return ScheduledChunk.next_of(seq, num_tokens, num_drafts)


def test_only_decode_steps_of_one_query_length_are_graph_steps():
    decode, verify = chunk(5, 3, 1), chunk(5, 3, 3, num_drafts=2)
    assert decode_query_len([decode, chunk(9, 1, 1)]) == 1
    assert decode_query_len([verify, chunk(4, 2, 3, num_drafts=2)]) == 3
    assert decode_query_len([]) is None
    assert decode_query_len([decode, verify]) is None  # mixed query lengths
    assert decode_query_len([decode, chunk(5, 0, 5)]) is None  # a prefill chunk beside
    assert decode_query_len([chunk(5, 0, 1)]) is None  # the prompt's last token: could be a prompt-table row
    assert decode_query_len([chunk(5, 4, 3)]) is None  # a recompute of generated tokens after preemption
    not_sampling = ScheduledChunk(decode.seq, decode.start - 1, 1, samples=False)
    assert decode_query_len([not_sampling]) is None


@pytest.fixture(scope="module")
def tiny_model() -> MiMoV2ForCausalLM:
    # full and sliding layers (sinks on sliding ones), window 8 in blocks of 4, dense + MoE layers, 3 MTP layers
    model = MiMoV2ForCausalLM(MiMoV2Config.from_hf_config(tiny_hub_config(num_nextn_predict_layers=3)))
    randomize_weights(model, seed=0)
    return model.requires_grad_(False).eval().to(DEVICE)


@contextlib.contextmanager
def fused_experts(model):
    layers = [m for m in model.modules() if isinstance(m, MiMoV2MoE)]
    for layer in layers:
        layer.impl = "fused"
    try:
        yield
    finally:
        for layer in layers:
            layer.impl = "auto"


@pytest.fixture
def fused_moe(tiny_model):
    with fused_experts(tiny_model):
        yield


def make_engine(model, *, graphs: bool, num_speculative_tokens: int = 0, override=None, **overrides) -> LLMEngine:
    """An engine with the Triton kernels; `graphs` runs the static-input forward (eager on the CPU) for decodes."""
    config = dict(max_num_seqs=4, max_num_batched_tokens=32, max_prefill_chunk=6, block_size=4, max_model_len=64,
                  num_full_blocks=48, seed=0, attention_kernel="triton", cuda_graphs=int(graphs),
                  num_speculative_tokens=num_speculative_tokens)
    with pytest.MonkeyPatch.context() as patch:
        if graphs and DEVICE.type == "cpu":  # as on a CUDA device
            patch.setattr(engine_module, "graphs_unavailable", lambda *args: None)
        engine = LLMEngine(model, EngineConfig(**config | overrides), test_draft_override=override)
    assert (engine.runner.graphs is not None) is graphs
    return engine


PROMPTS = [[(salt * 31 + 7 * i + 5) % 96 for i in range(n)] for salt, n in enumerate([3, 13, 21])]
# different lengths: the batch shrinks 3 -> 2 -> 1 (buckets 4, 2, 1) while the rings wrap (window 8)
PARAMS = [SamplingParams(max_tokens=n, temperature=0.0) for n in (18, 11, 6)]


@pytest.fixture(scope="module")
def eager_tokens(tiny_model) -> list[list[int]]:
    """The eager engine's greedy tokens for PROMPTS (Triton kernels, fused experts): the graph tests' reference,
    generated once (the interpreter makes each run seconds)."""
    with fused_experts(tiny_model):
        return generate(make_engine(tiny_model, graphs=False), PROMPTS, PARAMS)


def test_graphs_are_off_on_the_cpu(tiny_model):
    model = copy.deepcopy(tiny_model).to(CPU)
    assert graphs_unavailable(model, CPU, True) == "a cpu device (CUDA graphs need a CUDA device)"
    config = dict(max_num_seqs=4, max_num_batched_tokens=32, block_size=4, max_model_len=64, num_full_blocks=48)
    engine = LLMEngine(model, EngineConfig(**config))  # cuda_graphs=1, the default
    assert engine.runner.graphs is None
    assert engine.runner.kv_cache.num_blocks[LayerKind.FULL] == 48  # no scratch block
    off = LLMEngine(model, EngineConfig(**config, cuda_graphs=0))
    assert generate(engine, PROMPTS, PARAMS) == generate(off, PROMPTS, PARAMS)


@pytest.mark.usefixtures("fused_moe")
def test_static_input_forward_emits_the_eager_tokens_and_logits(tiny_model, eager_tokens):
    """Greedy tokens equal the eager engine's; at every graph step the eager forward of the same chunks gives the
    same hidden states and logits (float32 here)."""
    eager = eager_tokens
    engine = make_engine(tiny_model, graphs=True)
    runner = engine.runner
    assert runner.graphs.buckets == [1, 2, 4]
    assert runner.kv_cache.num_blocks[LayerKind.FULL] == 48 + 1  # the padding rows' scratch block
    assert engine.kv_stats()["full"]["total_blocks"] == 48
    forward, compared = runner.forward, []

    def both(inputs):
        hidden, logits = forward(inputs)
        if inputs.graph is not None:
            eager_inputs = runner.prepare(inputs.chunks, allow_graph=False, fed=inputs.fed)
            eager_hidden, eager_logits = forward(eager_inputs)
            torch.testing.assert_close(hidden, eager_hidden, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
            compared.append(inputs.graph.bucket)
        return hidden, logits

    runner.forward = both
    assert generate(engine, PROMPTS, PARAMS) == eager
    # every all-decode step: the first sequence's 18 tokens take 18 steps; steps 2-4 still prefill the others
    assert runner.graphs.replays == len(compared) == 14
    assert sorted(set(compared)) == [1, 2, 4]


@pytest.mark.usefixtures("fused_moe")
def test_overlapped_graph_steps_take_their_ids_from_the_step_ahead(tiny_model):
    """Overlap: a graph step launched before the host read the tokens it follows copies them into the graph's
    static ids on the device; greedy tokens equal the eager engine's without overlap."""
    prompts = PROMPTS[:2]  # 2 then 1 sequences: buckets 2 and 1, the batch shrinking
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (10, 6)]
    eager = generate(make_engine(tiny_model, graphs=False, overlap_steps=0), prompts, params)
    engine = make_engine(tiny_model, graphs=True, overlap_steps=1)
    graphs, fed = engine.runner.graphs, []
    prepare = graphs.prepare
    graphs.prepare = lambda chunks, ids=None: fed.append(ids is not None) or prepare(chunks, ids)
    assert generate(engine, prompts, params) == eager
    assert sum(fed) == graphs.replays >= 7  # every decode after the prefills was launched ahead, fed


@pytest.mark.usefixtures("fused_moe")
def test_preempted_sequences_recompute_eagerly_then_decode_in_graphs(tiny_model, preemptions):
    prompts = [[(5 * salt + 3 * i + 1) % 96 for i in range(8)] for salt in range(4)]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    small = dict(num_full_blocks=12, max_model_len=32)  # 4 sequences of 18 tokens need 20 blocks: preemption
    eager = generate(make_engine(tiny_model, graphs=False, **small), prompts, params)
    assert preemptions
    preemptions.clear()
    engine = make_engine(tiny_model, graphs=True, **small)
    assert generate(engine, prompts, params) == eager
    assert preemptions and engine.runner.graphs.replays > 0


@pytest.mark.usefixtures("fused_moe")
def test_mtp_verify_steps_replay_graphs_of_one_plus_k_tokens(tiny_model, eager_tokens):
    eager = eager_tokens
    recorded = {f"generate-{i}": p + t for i, (p, t) in enumerate(zip(PROMPTS, eager))}
    engine = make_engine(tiny_model, graphs=True, num_speculative_tokens=2,
                         override=ReplayDrafts(recorded, 96, accept_rate=0.7))
    assert engine.runner.graphs.query_lens == (1, 3)
    steps = []
    replay = engine.runner.graphs.replay
    engine.runner.graphs.replay = lambda step: steps.append(step.query_len) or replay(step)
    assert generate(engine, PROMPTS, PARAMS) == eager
    assert 3 in steps  # verifies of 1 + 2 tokens ran through the static-input forward


def record_drafts(engine: LLMEngine) -> list[dict[str, list[int]]]:
    """Every drafting pass's drafts, by request id, in order (the engine's drafter wrapped)."""
    drafter, passes = engine.runner.drafter, []
    step = drafter.step

    def recording(chunks, *args):
        states = step(chunks, *args)
        passes.append({chunks[i].seq.request_id: state.drafts for i, state in states.items()})
        return states

    drafter.step = recording
    return passes


@pytest.mark.usefixtures("fused_moe")
@pytest.mark.parametrize(("k", "accept_rate"), [(2, None), (3, 0.5)])
def test_drafting_graphs_draft_what_the_eager_drafter_does(tiny_model, eager_tokens, k, accept_rate):
    """The MTP layers' own greedy drafts (accept_rate None), or replayed ones kept half the time: the drafting
    graphs (windows of 2k rows, KV of the rows below mtp_done written to the scratch block) propose the eager
    drafter's drafts at every pass, so the tokens and the acceptance are the same too."""
    override = None
    if accept_rate is not None:
        recorded = {f"generate-{i}": p + t for i, (p, t) in enumerate(zip(PROMPTS, eager_tokens))}
        override = lambda: ReplayDrafts(recorded, 96, accept_rate=accept_rate, seed=1)  # noqa: E731

    def engine(graphs):
        return make_engine(tiny_model, graphs=graphs, num_speculative_tokens=k, override=override and override())

    eager, graphed = engine(False), engine(True)
    assert eager.runner.drafter.graphs is None
    draft_graphs = graphed.runner.drafter.graphs
    assert draft_graphs.rows_per_seq == 2 * k and draft_graphs.buckets == [1, 2, 4]
    eager_passes, graph_passes = record_drafts(eager), record_drafts(graphed)
    assert generate(graphed, PROMPTS, PARAMS) == generate(eager, PROMPTS, PARAMS)
    assert graph_passes == eager_passes
    assert graphed.speculative_stats() == eager.speculative_stats()
    assert draft_graphs.replays > 0  # steady decoding drafted through the graphs ...
    assert draft_graphs.replays < len(graph_passes)  # ... the passes right after a prefill eagerly


@pytest.mark.usefixtures("fused_moe")
def test_sampling_requests_draft_eagerly(tiny_model):
    engine = make_engine(tiny_model, graphs=True, num_speculative_tokens=2)
    sampled = [SamplingParams(max_tokens=n, temperature=0.8, seed=3) for n in (9, 6)]
    reference = make_engine(tiny_model, graphs=False, num_speculative_tokens=2)
    assert generate(engine, PROMPTS[:2], sampled) == generate(reference, PROMPTS[:2], sampled)
    assert engine.runner.graphs.replays > 0 and engine.runner.drafter.graphs.replays == 0


def test_warm_up_runs_graph_and_eager_decodes_and_leaves_the_engine_as_new(tiny_model):
    """`LLMEngine.warm_up` prefills a long prompt alone, a short one beside the long one's decode, decodes both
    through the graphs, then eagerly (both with a prompt of the middle tile, then the long one alone), and leaves
    nothing behind: no sequence, every block free, the graphs back in place, and the seeded stream untouched (the
    tokens after it are a fresh engine's)."""
    engine = make_engine(tiny_model, graphs=True, overlap_steps=1)  # as served on CUDA: steps queued ahead
    runner, graphs = engine.runner, engine.runner.graphs
    prepared, prepare = [], runner.prepare

    def recording(chunks, *args, **kwargs):
        prepared.append((runner.graphs is not None, sorted(c.num_tokens for c in chunks)))
        return prepare(chunks, *args, **kwargs)

    runner.prepare = recording
    assert engine.warm_up() > 0
    runner.prepare = prepare
    assert prepared[0] == (True, [6])  # the long prompt alone (max_prefill_chunk 6 here)
    assert (True, [1, 6]) in prepared  # the short one's first chunk beside the long one's decode
    assert graphs.replays >= 2
    eager_decodes = [sizes for with_graphs, sizes in prepared if not with_graphs]
    assert [1, 1] in eager_decodes and [1] in eager_decodes
    # and the one prompt of the tile between decode's and a long chunk's (GQA group 4: 5-16 tokens, 64-row tiles)
    assert sorted(n for sizes in eager_decodes for n in sizes if n > 1) == [5]
    assert runner.graphs is graphs and not engine.has_unfinished()
    assert all(pool["free_blocks"] == pool["total_blocks"] for pool in engine.kv_stats().values())
    sampled = [SamplingParams(max_tokens=n, temperature=1.0) for n in (18, 11, 6)]  # the engine's seeded stream
    assert generate(engine, PROMPTS, sampled) == generate(make_engine(tiny_model, graphs=True), PROMPTS, sampled)


def test_warm_up_needs_an_idle_engine_and_is_on_by_default_on_cuda_only(tiny_model):
    engine = make_engine(tiny_model, graphs=False)
    assert engine.warms_up_at_load is (DEVICE.type == "cuda")
    assert make_engine(tiny_model, graphs=False, warm_up=1).warms_up_at_load
    assert not make_engine(tiny_model, graphs=False, warm_up=0).warms_up_at_load
    with pytest.raises(ValueError, match="warm_up must be none, 0 or 1"):
        EngineConfig(num_full_blocks=8, warm_up=2)
    engine.add_request("r", PROMPTS[0], PARAMS[0])
    with pytest.raises(RuntimeError, match="needs an idle engine"):
        engine.warm_up()
    for max_model_len in (8, 24):  # below the warm-up's own prompt and decode lengths: they shrink to fit
        short = make_engine(tiny_model, graphs=False, max_num_batched_tokens=32, max_prefill_chunk=32,
                            max_model_len=max_model_len)
        short.warm_up()
        assert not short.has_unfinished()


def kernel_variant(kernel, args: tuple, kwargs: dict) -> tuple:
    """What Triton compiles a launch of `kernel` for: its constexprs and launch options by value, integer
    arguments as 1 / divisible by 16 / other, tensors by dtype and 16-byte alignment (not `do_not_specialize`)."""
    params = inspect.signature(kernel.fn).parameters
    skip = set(kernel.kwargs.get("do_not_specialize") or ())
    key = [kernel.__name__]
    for name, value in sorted((dict(zip(kernel.arg_names, args)) | kwargs).items()):
        if name in skip:
            continue
        if "constexpr" in str(params[name].annotation if name in params else "") or name in ("num_warps", "num_stages"):
            key.append((name, value))
        elif isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
            key.append((name, type(value).__name__))
        elif isinstance(value, int):
            key.append((name, "1" if value == 1 else "16" if value % 16 == 0 else "n"))
        else:
            key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
    return tuple(key)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="records each launch through Triton's interpreter (the CPU suite); on a GPU "
                           "benchmarks/bench_first_request.py measures what the warm-up leaves to the first requests")
@pytest.mark.usefixtures("fused_moe")
def test_after_the_warm_up_requests_launch_no_kernel_variant_it_did_not(tiny_model, monkeypatch):
    """The Triton kernels a served engine runs (paged attention, its split combine, the fused MoE; the layer kernels
    are CUDA-only) compile per variant at first launch: after `warm_up`, requests of other lengths, alone, together
    and joining a running batch, launch only variants the warm-up compiled."""
    from triton.runtime.interpreter import InterpretedFunction

    variants, run = set(), InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        variants.add(kernel_variant(self, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    engine = make_engine(tiny_model, graphs=True, overlap_steps=1, max_prefill_chunk=32)
    engine.warm_up()
    warmed, variants = variants, set()
    generate(engine, [PROMPTS[1]], [PARAMS[1]])  # alone
    generate(engine, PROMPTS, PARAMS)  # together
    engine.add_request("running", PROMPTS[2], PARAMS[0])
    for _ in range(3):
        engine.step()
    engine.add_request("joining", PROMPTS[0] * 5, PARAMS[2])  # a mixed step
    while engine.has_unfinished():
        engine.step()
    assert variants and variants <= warmed, "\n".join(map(str, sorted(variants - warmed)))
