"""The encoders' fast paths on a CUDA device against the reference path, at MiMo-V2.5 widths, in bf16.

Each comparison draws fresh random inputs. Tolerances are bf16's: the reference path runs the same bf16 weights
with float32 attention scores, so both differ from a float32 forward by bf16 rounding; the fast path must stay
within a small multiple of the reference path's own bf16 error.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from builders.presets import V2_5
from mimo.loading import build_module
from mimo.models.audio_tokenizer import AudioTokenizerConfig, MiMoAudioTokenizer
from mimo.models.audio_tower import AudioConfig, MiMoAudioEncoder
from mimo.models.encoder_attention import SegmentAttention
from mimo.models.vision_tower import MiMoVisionTransformer, VisionConfig
from mimo.processing.audio import log_mel_spectrogram
from mimo.processing.config import ProcessorConfig, SpecialTokenIds

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="GPU kernel parity: needs a CUDA device (run on the GPU machine)"
)
CUDA = torch.device("cuda")
_spec = importlib.util.spec_from_file_location(
    "bench_encoders", Path(__file__).parent.parent / "benchmarks" / "bench_encoders.py"
)
bench_encoders = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_encoders)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    error = float((out.double() - ref.double()).norm() / ref.double().norm())
    print(f"relative error {error:.2e}")  # the GPU run's log records the margins (pytest -s)
    return error


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return bench_encoders.randomize(model)


@pytest.mark.parametrize("seq_lens, heads, kv_heads, causal, window", [
    ([8160], 32, 8, False, None),  # a 1920x1080 image, full block
    ([8160], 32, 8, False, 64),  # windowed block with sinks
    ([4096, 1536, 256, 4096], 32, 8, False, None),  # several images in one forward
    ([4096, 1536, 256, 4096], 32, 8, False, 64),
    ([1500, 3000, 7], 16, 16, True, 128),  # audio tokenizer segments: causal windowed layers
    ([1500, 3000, 7], 16, 16, True, None),  # causal full layers
])
def test_flex_segment_attention_matches_reference(seq_lens, heads, kv_heads, causal, window):
    total = sum(seq_lens)
    q = torch.randn(total, heads, 64, device=CUDA, dtype=torch.bfloat16)
    k = torch.randn(total, kv_heads, 64, device=CUDA, dtype=torch.bfloat16)
    v = torch.randn(total, kv_heads, 64, device=CUDA, dtype=torch.bfloat16)
    sinks = torch.randn(heads, device=CUDA) if window is not None and not causal else None
    reference = SegmentAttention(seq_lens, CUDA, [], impl="reference", query_chunk=1024)
    flex = SegmentAttention(seq_lens, CUDA, [(causal, window)])
    assert flex.impl == "flex"
    out = torch.full_like(q, float("nan"))
    out.copy_(flex(q, k, v, scale=0.125, causal=causal, window=window, sinks=sinks))
    expected = reference(q, k, v, scale=0.125, causal=causal, window=window, sinks=sinks)
    assert relative_error(out, expected) < 1e-2


def vision_tower(dtype: torch.dtype) -> MiMoVisionTransformer:
    # V2.5 widths, six blocks: full, two row-window, two column-window (a run), full
    hub = {**V2_5.vision_config, "depth": 6, "fullatt_block_indexes": [0, 5],
           "vit_window_attn_types": [-1, 0, 0, 1, 1, -1]}
    config = VisionConfig.from_dict(hub)
    torch.manual_seed(0)
    return randomized(build_module(lambda: MiMoVisionTransformer(config), dtype, CUDA), seed=1)


def test_vision_tower_fast_path_matches_reference_and_batches_without_changing_items():
    model = vision_tower(torch.bfloat16)
    model32 = vision_tower(torch.float32)
    model32.load_state_dict({name: t.float() for name, t in model.state_dict().items()})
    grids = [(1, 68, 120), (1, 32, 48), (2, 16, 16)]
    pixels = [torch.randn(math.prod(g), 1536, device=CUDA) for g in grids]
    with torch.no_grad():
        exact = model32(torch.cat(pixels), torch.tensor(grids))
        model.attention_impl = "reference"
        reference = model(torch.cat(pixels), torch.tensor(grids))
        model.attention_impl = "auto"
        batched = model(torch.cat(pixels), torch.tensor(grids))
        single = torch.cat([model(p, torch.tensor([g])) for p, g in zip(pixels, grids)])
    reference_error = relative_error(reference, exact)
    assert reference_error < 2e-2
    assert relative_error(batched, exact) < 2 * reference_error + 1e-3
    assert relative_error(batched, reference) < 2 * reference_error + 1e-3
    assert relative_error(batched, single) < 1e-2


def test_audio_tokenizer_fast_path_matches_reference():
    hub = {**V2_5.audio_tokenizer_config, "encoder_layers": 4, "encoder_skip_layer_id": 3}
    config = AudioTokenizerConfig.from_dict(hub)
    torch.manual_seed(0)
    tokenizer = randomized(build_module(lambda: MiMoAudioTokenizer(config), torch.bfloat16, CUDA), seed=2)
    # a 30 s clip and a 70 s one (two segments of the 60 s split), one padded batch
    mels = [torch.randn(n, config.n_mels, device=CUDA) for n in (3001, 7001)]
    lengths = [3001, 6000, 1001]
    batch = torch.nn.utils.rnn.pad_sequence(list(torch.cat(mels).split(lengths)), batch_first=True)
    with torch.no_grad():
        tokenizer.encoder.attention_impl = "reference"
        reference = tokenizer.encoder.features(batch, torch.tensor(lengths, device=CUDA))
        reference_codes = tokenizer.encode_batch(mels)
        tokenizer.encoder.attention_impl = "auto"
        fast = tokenizer.encoder.features(batch, torch.tensor(lengths, device=CUDA))
        fast_codes = tokenizer.encode_batch(mels)
    assert fast.shape == reference.shape
    assert relative_error(fast, reference) < 2e-2
    for got, want in zip(fast_codes, reference_codes):
        assert got.shape == want.shape
        # the first quantizer's nearest codeword flips only on near-ties of bf16-rounded features
        assert (got[:, 0] == want[:, 0]).float().mean() > 0.9


def test_audio_tower_compiled_on_gpu_matches_float32_eager():
    config = AudioConfig.from_dict(V2_5.audio_config)
    torch.manual_seed(0)
    tower = randomized(build_module(lambda: MiMoAudioEncoder(config, compile_layers=True), torch.bfloat16, CUDA), 3)
    tower32 = build_module(lambda: MiMoAudioEncoder(config), torch.float32, CUDA).eval()
    tower32.load_state_dict({name: t.float() for name, t in tower.state_dict().items()})
    codes = [torch.randint(0, 1024, (n, config.audio_channels), device=CUDA) for n in (750, 1751)]
    with torch.no_grad():
        out = tower.encode_batch(codes)
        exact = tower32.encode_batch(codes)
    for got, want in zip(out, exact):
        assert got.shape == want.shape
        assert relative_error(got, want) < 2e-2


@pytest.mark.parametrize("signal", ["noise", "tone", "chirp"])
def test_log_mel_on_the_gpu_matches_the_cpu(signal):
    config = ProcessorConfig(tokens=SpecialTokenIds(*range(9)))
    n = 30 * 24000 + 137
    t = torch.arange(n, dtype=torch.float64) / 24000
    waveform = {
        "noise": torch.randn(n, dtype=torch.float64) * 0.1,
        "tone": 0.5 * torch.sin(2 * math.pi * 1000 * t),  # deep spectral nulls: float64 matters there
        "chirp": 0.3 * torch.sin(2 * math.pi * (200 + 300 * t) * t),
    }[signal].float()
    expected = log_mel_spectrogram(waveform, config)
    out = log_mel_spectrogram(waveform.to(CUDA), config)
    assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=0)
