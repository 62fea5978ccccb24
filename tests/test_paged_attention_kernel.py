"""The Triton paged-attention kernel equals the reference path (gather + `attention_with_sinks`) of `PagedAttention`.

Without CUDA the kernel runs under Triton's interpreter on the CPU (TRITON_INTERPRET=1, set before triton is
imported), so shapes stay small; on a GPU machine the same cases run compiled on the device. Every case draws fresh
random pools (all slots filled, so a wrong slot reads a wrong value), scattered block tables, and a step of several
sequences of different lengths, then attends the step's new tokens with both paths over the same cache.
"""

import json
import math
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run in numpy on the CPU
triton = pytest.importorskip("triton", reason="the Triton kernel needs the triton package (scripts/setup.sh installs it)")

from hf_reference import randomize_weights, tiny_hub_config  # noqa: E402

from mimo.config import MiMoV2Config  # noqa: E402
from mimo.engine import EngineConfig, LLMEngine, SamplingParams, generate  # noqa: E402
from mimo.engine.attention_kernel import _attention_kernel, _combine_kernel, kernel_config, paged_attention  # noqa: E402
from mimo.engine.speculative import ReplayDrafts  # noqa: E402
from mimo.engine.kv_cache import KVCache, KVLayerSpec, LayerKind  # noqa: E402
from mimo.engine.paged_attention import PagedAttention, PagedAttentionMetadata, use_attention_kernel  # noqa: E402
from mimo.models.attention import attention_with_sinks  # noqa: E402
from mimo.models.language_model import MiMoV2ForCausalLM  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK_SIZE = 4


def make_step(generator: torch.Generator, spec: KVLayerSpec, starts: list[int], counts: list[int],
              window: int | None, num_blocks: int | None, dtype: torch.dtype, block_size: int = BLOCK_SIZE):
    """A KV cache of one layer with random contents, scattered tables for the sequences, and both metadatas."""
    if spec.kind is LayerKind.FULL:
        lengths = [math.ceil((s + n) / block_size) for s, n in zip(starts, counts)]
    else:  # one ring of window + chunk per sequence, as the block manager sizes it
        ring = math.ceil((window + max(counts)) / block_size)
        lengths = [min(ring, math.ceil((s + n) / block_size)) for s, n in zip(starts, counts)]
    num_blocks = num_blocks or sum(lengths) + 8
    assert sum(lengths) <= num_blocks
    kv_cache = KVCache([spec], {spec.kind: num_blocks}, block_size, dtype, DEVICE)
    for pool in (kv_cache.k[0], kv_cache.v[0]):
        pool.copy_(torch.randn(pool.shape, generator=generator, device=DEVICE))
    physical = torch.randperm(num_blocks, generator=generator, device=DEVICE)
    width = max(lengths) + 2  # stale columns past each table's length must not be read
    table = torch.randint(0, num_blocks, (len(starts), width), generator=generator, device=DEVICE)
    offset = 0
    for i, n in enumerate(lengths):
        table[i, :n] = physical[offset:offset + n]
        offset += n
    tables = {spec.kind: (table, torch.tensor(lengths, device=DEVICE))}
    return kv_cache, [PagedAttentionMetadata.build(starts, counts, tables, block_size, window, DEVICE, use_kernel)
                      for use_kernel in (False, True)]


def randn(generator: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=DEVICE).to(dtype)


def compare(spec: KVLayerSpec, num_q_heads: int, starts: list[int], counts: list[int], *, window: int | None,
            with_sinks: bool, dtype: torch.dtype = torch.float32, num_splits: int | None = None, seed: int = 0,
            num_blocks: int | None = None, block_size: int = BLOCK_SIZE):
    """Returns the kernel's output and the reference path's."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    kv_cache, (reference, kernel) = make_step(generator, spec, starts, counts, window, num_blocks, dtype, block_size)
    num_tokens = sum(counts)
    q = randn(generator, num_tokens, num_q_heads, spec.head_dim, dtype=dtype)
    k = randn(generator, num_tokens, spec.num_kv_heads, spec.head_dim, dtype=dtype)
    v = randn(generator, num_tokens, spec.num_kv_heads, spec.v_head_dim, dtype=dtype)
    sinks = randn(generator, num_q_heads) if with_sinks else None
    scale = spec.head_dim**-0.5
    expected = PagedAttention(kv_cache, reference).attend(0, q, k, v, sliding_window=window, sinks=sinks, scale=scale)
    pool = kernel.pools[spec.kind]
    out = paged_attention(
        q, kv_cache.k[0], kv_cache.v[0], block_table=pool.block_table, table_lens=pool.table_lens,
        cu_q=kernel.cu_query, seq_ends=kernel.seq_ends, query_counts=counts, key_counts=pool.key_counts,
        scale=scale, sliding_window=window, sinks=sinks, num_splits=num_splits,
    )  # fmt: skip
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    return out, expected


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    error = float((out.double() - expected.double()).norm() / expected.double().norm())
    print(f"relative error {error:.2e}")  # the GPU run's log records the margins (pytest -s)
    return error


# (starts, counts): decodes of different lengths; decode + speculative verify + prefill chunks; one prefill from 0
STEPS = {
    "decode": ([37, 5, 18], [1, 1, 1]),
    "mixed": ([33, 0, 11, 50], [4, 9, 1, 6]),
    "prefill": ([0], [23]),
}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("kind", [LayerKind.FULL, LayerKind.SLIDING])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_kernel_matches_reference_full_and_sliding(step, kind, with_sinks):
    starts, counts = STEPS[step]
    compare(KVLayerSpec(kind, 2, 48, 32), 8, starts, counts, window=7 if kind is LayerKind.SLIDING else None,
            with_sinks=with_sinks)


@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(4, 4), (6, 2), (16, 1), (32, 2), (40, 1)])
def test_gqa_ratios(num_q_heads, num_kv_heads):
    """Groups of 1, 3, 16, 16 and 40 query heads per kv head (3 and 40 leave rows of a tile unused: 40 puts 3 tokens
    in 128 rows)."""
    starts, counts = STEPS["mixed"]
    for kind, window in ((LayerKind.FULL, None), (LayerKind.SLIDING, 6)):
        compare(KVLayerSpec(kind, num_kv_heads, 32, 16), num_q_heads, starts, counts, window=window,
                with_sinks=True, seed=num_q_heads)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_split_keys_combine_through_the_log_sum_exp(num_splits):
    """Flash decoding: shares of the key blocks (some empty for the shortest sequences) merged with the sink."""
    starts, counts = [61, 3, 29], [1, 2, 4]
    for kind, window in ((LayerKind.FULL, None), (LayerKind.SLIDING, 9)):
        compare(KVLayerSpec(kind, 2, 48, 32), 8, starts, counts, window=window, with_sinks=True,
                num_splits=num_splits, seed=num_splits)


def test_sliding_ring_wraps_several_times():
    """Positions far past the ring (8 blocks of 4 for window 13 + chunk 5 ... 19 tokens): only the window is read."""
    compare(KVLayerSpec(LayerKind.SLIDING, 1, 32, 32), 4, [201, 90, 400], [5, 1, 3], window=13, with_sinks=True)


@pytest.mark.parametrize(("head_dim", "v_head_dim"), [(12, 8), (40, 24), (64, 64)])
def test_head_dims_padded_and_split(head_dim, v_head_dim):
    """q/k dims below a dot's 16, with a padded rest (40 = 32 + 8 of 16), and equal powers of two; v padded."""
    starts, counts = STEPS["mixed"]
    compare(KVLayerSpec(LayerKind.FULL, 2, head_dim, v_head_dim), 4, starts, counts, window=None, with_sinks=True)


def test_bfloat16():
    starts, counts = STEPS["mixed"]
    out, expected = compare(KVLayerSpec(LayerKind.SLIDING, 2, 48, 32), 8, starts, counts, window=7,
                            with_sinks=True, dtype=torch.bfloat16, num_splits=2)
    assert relative_error(out, expected) < 1e-2


def test_kernel_is_what_paged_attention_runs_when_chosen():
    """`use_kernel` metadata routes `PagedAttention.attend` to the kernel (no gathered key slots are built)."""
    spec = KVLayerSpec(LayerKind.SLIDING, 2, 32, 16)
    generator = torch.Generator(device=DEVICE).manual_seed(3)
    starts, counts = STEPS["mixed"]
    kv_cache, (reference, kernel) = make_step(generator, spec, starts, counts, 5, None, torch.float32)
    assert kernel.pools[spec.kind].key_slots is None and reference.pools[spec.kind].key_slots is not None
    q, k, v = randn(generator, sum(counts), 4, 32), randn(generator, sum(counts), 2, 32), randn(generator, sum(counts), 2, 16)
    sinks = randn(generator, 4)
    outs = [PagedAttention(kv_cache, metadata).attend(0, q, k, v, sliding_window=5, sinks=sinks, scale=0.2)
            for metadata in (reference, kernel)]
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-5, atol=2e-5)


def test_against_attention_with_sinks_directly():
    """One sequence whose cache holds exactly its history: the kernel equals `attention_with_sinks` itself."""
    generator = torch.Generator(device=DEVICE).manual_seed(4)
    spec = KVLayerSpec(LayerKind.FULL, 2, 48, 32)
    history, new = 21, 3
    kv_cache = KVCache([spec], {LayerKind.FULL: 8}, BLOCK_SIZE, torch.float32, DEVICE)
    keys, values = randn(generator, history + new, 2, 48), randn(generator, history + new, 2, 32)
    table = torch.tensor([[5, 2, 7, 0, 3, 6, 1]], device=DEVICE)
    slots = table[0, torch.arange(history + new, device=DEVICE) // BLOCK_SIZE] * BLOCK_SIZE + torch.arange(
        history + new, device=DEVICE) % BLOCK_SIZE
    kv_cache.write(0, slots, keys, values)
    q, sinks = randn(generator, new, 8, 48), randn(generator, 8)
    out = paged_attention(q, kv_cache.k[0], kv_cache.v[0], block_table=table, table_lens=torch.tensor([7], device=DEVICE),
                          cu_q=torch.tensor([0, new], dtype=torch.int32, device=DEVICE),
                          seq_ends=torch.tensor([history + new], dtype=torch.int32, device=DEVICE),
                          query_counts=[new], key_counts=[history + new], scale=0.15, sliding_window=None, sinks=sinks)
    positions = torch.arange(history + new, device=DEVICE)
    expected = attention_with_sinks(q, keys, values, q_pos=positions[history:], k_pos=positions, scale=0.15,
                                    sliding_window=None, sinks=sinks)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)


def test_choice_of_kernel(monkeypatch):
    assert use_attention_kernel("reference", torch.device("cuda")) is False
    assert use_attention_kernel("auto", torch.device("cpu")) is False
    assert use_attention_kernel("auto", torch.device("cuda")) is True
    with pytest.raises(ValueError, match="attention kernel 'flash' is not one of auto, triton, reference"):
        use_attention_kernel("flash", DEVICE)
    with pytest.raises(ValueError, match="EngineConfig.attention_kernel='flash' is not one of"):
        EngineConfig(num_full_blocks=8, attention_kernel="flash")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="runs only under Triton's interpreter"):
        use_attention_kernel("triton", torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_model() -> MiMoV2ForCausalLM:
    # full and sliding layers (4 and 8 kv heads, sinks on sliding ones), window 8 in blocks of 4, 3 MTP layers
    model = MiMoV2ForCausalLM(MiMoV2Config.from_hf_config(tiny_hub_config(num_nextn_predict_layers=3)))
    randomize_weights(model, seed=0)
    return model.requires_grad_(False).eval().to(DEVICE)


@pytest.mark.parametrize("num_speculative_tokens", [0, 2])
def test_engine_greedy_tokens_equal_the_reference_path(tiny_model, num_speculative_tokens):
    """The whole engine with the kernel (decodes, 6-token prefill chunks, rings wrapped, MTP verify of 1 + 2 tokens
    and the MTP layers' own attention) emits the reference path's greedy tokens."""
    vocab = tiny_model.config.vocab_size
    prompts = [[(salt * 31 + 7 * i) % vocab for i in range(n)] for salt, n in enumerate([3, 13, 21])]
    greedy = SamplingParams(max_tokens=6, temperature=0.0)

    def run(attention_kernel: str, override=None) -> list[list[int]]:
        config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, max_prefill_chunk=6, block_size=4,
                              max_model_len=64, num_full_blocks=64, seed=0, attention_kernel=attention_kernel,
                              num_speculative_tokens=num_speculative_tokens)
        engine = LLMEngine(tiny_model, config, test_draft_override=override)
        assert engine.runner.use_attention_kernel is (attention_kernel == "triton")
        return generate(engine, prompts, greedy)

    expected = run("reference")
    override = None
    if num_speculative_tokens:  # drafts that are mostly right, so verifies keep several tokens
        override = ReplayDrafts({f"generate-{i}": p + t for i, (p, t) in enumerate(zip(prompts, expected))}, vocab, 0.7)
    assert run("triton", override) == expected


# V2.5 widths (ref §1.2): 64 query heads; full layers 4 kv heads, sliding layers 8 with sinks and window 128;
# q/k head dim 192, v 128; the engine's 16-token blocks
V2_5_LAYERS = {"full": (KVLayerSpec(LayerKind.FULL, 4, 192, 128), None, False),
               "sliding": (KVLayerSpec(LayerKind.SLIDING, 8, 192, 128), 128, True)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="V2.5-width kernel parity in bf16: needs a CUDA device")
@pytest.mark.parametrize("layer", V2_5_LAYERS)
@pytest.mark.parametrize("context", [512, 4096])
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("query_len", [1, 4], ids=["decode", "verify_1+3"])
def test_v2_5_widths_bf16_on_gpu(layer, context, batch, query_len):
    """Decode (and MTP verify) steps of `batch` sequences around `context` tokens, lengths staggered, against the
    reference path in bf16 (float32 scores there): the kernel stays within bf16 rounding of it."""
    spec, window, with_sinks = V2_5_LAYERS[layer]
    ends = [context - 37 * i % 200 for i in range(batch)]
    out, expected = compare(spec, 64, [e - query_len for e in ends], [query_len] * batch, window=window,
                            with_sinks=with_sinks, dtype=torch.bfloat16, block_size=16, seed=context + batch)
    assert relative_error(out, expected) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="V2.5-width kernel parity in bf16: needs a CUDA device")
@pytest.mark.parametrize("layer", V2_5_LAYERS)
def test_v2_5_widths_prefill_chunks_on_gpu(layer):
    """Chunked prefill at V2.5 widths: a 512-token chunk after 3,584 cached tokens, beside a fresh 300-token prompt
    and two decodes, in one varlen step."""
    spec, window, with_sinks = V2_5_LAYERS[layer]
    out, expected = compare(spec, 64, [3584, 0, 700, 4000], [512, 300, 1, 1], window=window, with_sinks=with_sinks,
                            dtype=torch.bfloat16, block_size=16, seed=1)
    assert relative_error(out, expected) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture: needs a CUDA device")
def test_attend_captures_in_a_cuda_graph():
    """No host synchronisation inside `attend` (cache write + kernel, split-K and combine included): it captures in a
    CUDA graph, and a replay on new q/k/v equals an eager call."""
    spec, window, _ = V2_5_LAYERS["full"]
    generator = torch.Generator(device=DEVICE).manual_seed(5)
    starts, counts = [1000, 3000], [1, 1]
    kv_cache, (_, metadata) = make_step(generator, spec, starts, counts, window, None, torch.bfloat16, 16)
    backend = PagedAttention(kv_cache, metadata)
    q, k, v = (randn(generator, 2, h, d, dtype=torch.bfloat16) for h, d in ((64, 192), (4, 192), (4, 128)))

    def attend():
        return backend.attend(0, q, k, v, sliding_window=None, sinks=None, scale=192**-0.5)

    attend()  # compiles the kernels before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attend()
    for tensor in (q, k, v):
        tensor.copy_(randn(generator, *tensor.shape, dtype=torch.bfloat16))
    graph.replay()
    torch.testing.assert_close(captured, attend(), rtol=0, atol=0)


def compile_for_sm90(kernel, signature: dict[str, str], config: dict) -> dict[str, int]:
    """Compiles a kernel for an H100/H200 (sm_90) on this machine with the wheel's ptxas, as the launch at V2.5 shapes
    would (pointers and strides 16-divisible); returns the cubin's resource usage."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    options = {name: config.pop(name) for name in ("num_warps", "num_stages") if name in config}
    signature = signature | dict.fromkeys(config, "constexpr")
    divisible = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
                 if kind.startswith("*") or (name.startswith("stride") and name != "stride_table")}
    source = ASTSource(JITFunction(kernel.fn), signature, config, divisible)  # .fn: the Python function, interpreted or not
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                                check=True).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", report)}


ATTENTION_SIGNATURE = {
    **dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "out_ptr"], "*bf16"),
    **dict.fromkeys(["part_out_ptr", "part_m_ptr", "part_l_ptr"], "*fp32"),
    "block_table_ptr": "*i64", "table_lens_ptr": "*i64", "cu_q_ptr": "*i32", "seq_ends_ptr": "*i32",
    "sinks_ptr": "*bf16", "num_seqs": "i32", "num_q_heads": "i32", "scale_log2": "fp32", "window": "i32",
    "num_splits": "i32",
    **dict.fromkeys(["stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh", "stride_vb", "stride_vt",
                     "stride_vh", "stride_ot", "stride_oh", "stride_table"], "i32"),
}  # fmt: skip


# (layer, query tokens per sequence, num_splits) of the launches checked: batch-1 decode split over the keys, an MTP
# verify of 1 + 3 tokens with sinks, a prefill chunk (128-row tiles, 8 warps)
SM90_CASES = [("full", 1, 16), ("sliding", 4, 1), ("full", 512, 1)]


def sm90_resource_usage() -> list[dict[str, int]]:
    """Resource usage of each SM90_CASES launch, then of the split combine (run with the interpreter off)."""
    usages = []
    for layer, query_len, num_splits in SM90_CASES:
        spec, window, with_sinks = V2_5_LAYERS[layer]
        config = kernel_config(64, spec.num_kv_heads, spec.head_dim, spec.v_head_dim, 16, query_len, block_n=64,
                               num_splits=num_splits, sliding=window is not None, has_sinks=with_sinks,
                               dtype=torch.bfloat16, on_gpu=True)
        usages.append(compile_for_sm90(_attention_kernel, ATTENTION_SIGNATURE, config))
    combine = {"out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32",
               "sinks_ptr": "*bf16", "num_q_heads": "i32", "num_splits": "i32", "stride_ot": "i32", "stride_oh": "i32"}
    usages.append(compile_for_sm90(_combine_kernel, combine, dict(V_HEAD_DIM=128, DV_PAD=128, SPLITS_PAD=32,
                                                                  HAS_SINKS=True)))
    return usages


def test_kernel_compiles_for_h200_without_spills():
    """The compiled GPU path, which the interpreter does not exercise, builds for sm_90 at V2.5 widths and keeps its
    tiles in registers (no stack, no local memory). Compiled in a child process: the interpreter, once it has run
    here, leaves triton.language patched for itself."""
    pytest.importorskip("triton.backends.nvidia", reason="needs triton's NVIDIA backend (its ptxas)")
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_paged_attention_kernel as t; "
              "print(json.dumps(t.sm90_resource_usage()))")
    child = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], capture_output=True, text=True,
                           env=os.environ | {"TRITON_INTERPRET": "0"}, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    usages = json.loads(child.stdout.strip().splitlines()[-1])
    print(usages)
    for usage in usages:
        assert usage["STACK"] == 0 and usage["LOCAL"] == 0, usages


@pytest.mark.skipif(torch.cuda.is_available(), reason="its gloo ranks run the kernel on CPU tensors, under Triton's "
                    "interpreter, which this module sets only without CUDA; two ranks need two GPUs on the device")
def test_tensor_parallel_ranks_run_the_kernel(tmp_path):
    """TP 2 with the kernel on every rank (the workers get rank 0's choice with the step's tables) generates what one
    process generates on the reference path, MTP drafting included."""
    from builders.convert import convert
    from builders.tiny import build_checkpoint
    from mimo.loading import load_language_model
    from mimo.parallel.rank_driver import TensorParallelRanks

    checkpoint = build_checkpoint(tmp_path / "ckpt", fp8=True)
    deploy = convert(checkpoint, tmp_path / "deploy", tp=2, ep=2, progress=False)
    reference = load_language_model(checkpoint, torch.bfloat16, "cpu", dequantize_fp8=True).float()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, reference.config.vocab_size, (n,), generator=generator).tolist() for n in (5, 23)]
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    config = dict(max_num_seqs=4, max_num_batched_tokens=8, block_size=4, max_model_len=64, num_full_blocks=64)
    expected = generate(LLMEngine(reference, EngineConfig(**config, attention_kernel="reference")), prompts, greedy)
    ranks = TensorParallelRanks(deploy, torch.device("cpu"), torch.float32, with_mtp=True)
    try:
        engine = LLMEngine(ranks.model, EngineConfig(**config, attention_kernel="triton", num_speculative_tokens=2))
        ranks.serve(engine.runner.kv_cache)
        assert generate(engine, prompts, greedy) == expected
    finally:
        ranks.shutdown()
