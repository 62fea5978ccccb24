"""Encoder forwards at MiMo-V2.5 widths against the bf16 matrix rate of the same GPU, measured in the same run.

Rows (issue 11): the vision tower on one 1920x1080 image (grid 68 x 120 = 8160 patches), on a batch of eight
1024x1024 images in one forward (8 x 4096 patches), and the audio tokenizer + audio tower on one 30 s clip; and on
the CPU (`preprocess1080`, no GPU needed) `preprocess_request` for one 1920x1080 JPEG at V2.5 processor settings
with the bytes of the media tensors it ships to mimo_encoder, and (`split1080`, on the GPU where there is one, else
the CPU) one 1920x1080 JPEG preprocessed end to end on the media split (CPU decode, then resize / normalise /
patchify on the device; and nvJPEG on the device where torchvision has it) against the pre-split CPU path. Each GPU row times, on the same weights and inputs: today's reference path (float32 score blocks per segment, eager
layers), FlexAttention with eager layers, and the default CUDA path (`attention_impl="auto"`: FlexAttention in
torch.compile'd blocks / layer stack), plus audio experiments (compiled tower; `--cuda-graphs`). It counts the
FLOPs the forward must do (matrix products plus the attention pairs each query really sees) and divides by the
bf16 GEMM rate measured first. Each path's line prints as soon as it is measured.

    python -m benchmarks.bench_encoders                         # all rows, JSON to stdout's last line
    python -m benchmarks.bench_encoders --rows audio30 --profile --cuda-graphs --out results.json
    python -m benchmarks.bench_encoders --rows preprocess1080 --threads 1     # CPU only
    python -m benchmarks.bench_encoders --rows split1080 --threads 1          # the GPU if there is one

Weights are random (throughput does not depend on their values); sinks and biases are drawn non-zero.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from builders.presets import V2_5, hub_config
from mimo.loading import build_module
from mimo.models.audio_tokenizer import AudioTokenizerConfig, MiMoAudioTokenizer, segment_lengths
from mimo.models.audio_tower import AudioConfig, MiMoAudioEncoder
from mimo.models.vision_tower import MiMoVisionTransformer, VisionConfig
from mimo.processing.audio import log_mel_spectrogram
from mimo.processing.config import ProcessorConfig, SpecialTokenIds
from mimo.processing.chat import MediaPart
from mimo.processing.image import decode_jpeg_frames, frames_of, nvjpeg_available, preprocess_image, vision_patches
from mimo.processing.items import PACKED_MEDIA_TENSORS, Modality, pack_items, unpack_items
from mimo.processing.processor import preprocess_media
from mimo.processing.processor import MiMoProcessor
from mimo.processing.tokenizer_files import write_tiny_tokenizer
from mimo.serving.preprocess import preprocess_request

from benchmarks.limits import gemm_rate

CPU_ROWS = ("preprocess1080", "split1080")  # split1080 uses the GPU where there is one
ROWS = ("vit1080", "vit8x1024", "audio30", *CPU_ROWS)


def time_ms(fn: Callable, inputs: list, *, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn(input) over `repeats` calls (CUDA events), inputs rotated."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    events = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs[i % len(inputs)])
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def visible_pairs(length: int, causal: bool, window: int | None) -> int:
    """Query-key pairs attention_with_sinks lets through in one segment of `length` tokens."""
    if window is None or window >= length:
        return length * (length + 1) // 2 if causal else length * length
    # |i - j| <= w (non-causal) or 0 <= i - j <= w (causal): full rows minus the triangles cut at the ends
    one_side = length * window - window * (window + 1) // 2
    return length + (one_side if causal else 2 * one_side)


def vision_flops(config: VisionConfig, grids: list[tuple[int, int, int]]) -> float:
    h, d, heads, kv = config.hidden_size, config.head_dim, config.num_heads, config.num_key_value_heads
    n = sum(t * gh * gw for t, gh, gw in grids)
    segments = [gh * gw for t, gh, gw in grids for _ in range(t)]
    per_token = config.patch_dim * h  # patch embed
    per_token += config.depth * (h * (heads + 2 * kv) * d + heads * d * h + 3 * h * config.intermediate_size)
    merged = h * config.merge_unit
    flops = 2 * n * per_token + 2 * (n // config.merge_unit) * (merged * merged + merged * config.out_hidden_size)
    for i in range(config.depth):
        window = config.block_window(i)
        flops += 4 * heads * d * sum(visible_pairs(s, False, window) for s in segments)  # QK^T and PV
    return flops


def audio_flops(tok: AudioTokenizerConfig, audio: AudioConfig, t_mel: int) -> float:
    d = tok.d_model
    flops = 0
    codes = 0
    for n in segment_lengths(t_mel, audio.audio_segment_size):
        frames = (n - 1) // tok.stride_size + 1
        pooled = tok.code_length(n)
        codes += pooled
        flops += 2 * n * tok.n_mels * 3 * d + 2 * frames * d * 3 * d  # conv1, conv2
        flops += tok.encoder_layers * 2 * frames * (4 * d * d + 2 * d * tok.encoder_ffn_dim)
        flops += sum(4 * d * visible_pairs(frames, *tok.layer_attention(i)) for i in range(tok.encoder_layers))
        flops += 2 * pooled * d * d * tok.avg_pooler + 2 * pooled * d * sum(tok.codebook_size)  # pooler, RVQ
    groups = -(-codes // audio.group_size)
    tokens, dim = groups * audio.group_size, audio.input_local_dim
    inner = audio.input_local_attn_heads * audio.input_local_head_dim
    flops += audio.input_local_layers * (
        2 * tokens * (4 * dim * inner + 3 * dim * audio.input_local_intermediate_size)
        + 4 * inner * groups * audio.group_size**2
    )
    group_dim = dim * audio.group_size
    if audio.projection_layers == 1:
        flops += 2 * groups * group_dim * audio.out_hidden_size
    else:
        flops += 2 * groups * (group_dim * 4 * group_dim + 4 * group_dim * audio.out_hidden_size)
    return flops


def profile_table(fn: Callable, inp) -> str:
    """Kernels and host time of one call (torch.profiler), top entries by device time and by host time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(inp)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    return (averages.table(sort_by="cuda_time_total", row_limit=25)
            + averages.table(sort_by="self_cpu_time_total", row_limit=15))


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero sinks and biases (random init leaves sinks at 0)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("sinks"):
                param.normal_()
            elif name.endswith("bias"):
                param.normal_(0, 0.02)
    return model.eval()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def measure(
    name: str, fns: dict[str, Callable], inputs: list, flops: float, rate: float, args, reference_out: torch.Tensor,
    seconds: float | None = None,
) -> dict:
    """Time each path twice (the spread between the two is the noise), compare its output with the reference's,
    and print its line at once (a run cut short still shows the paths it finished)."""
    paths = {}
    with torch.no_grad():
        for path, fn in fns.items():
            slow = path == "reference"
            warmup, repeats = (1, args.reference_repeats) if slow else (args.warmup, args.repeats)
            compile_start = time.perf_counter()
            first = fn(inputs[0])
            torch.cuda.synchronize()
            first_s = time.perf_counter() - compile_start
            error = relative_error(first, reference_out)  # now: a CUDA graph's next replay overwrites `first`
            runs = [time_ms(fn, inputs, warmup=warmup, repeats=repeats) for _ in range(2)]
            ms = min(runs)
            paths[path] = {
                "ms": runs, "first_call_s": first_s, "tflop_per_s": flops / (ms * 1e-3) / 1e12,
                "fraction_of_gemm_rate": flops / (ms * 1e-3) / rate,
                "rel_err_vs_reference": error,
            }
            r = paths[path]
            extra = ""
            if seconds is not None:
                r["audio_s_per_s"] = seconds / (ms * 1e-3)
                extra = f"  {r['audio_s_per_s']:.0f} s audio/s"
            print(f"{name:10s} {path:30s} {runs[0]:8.2f} / {runs[1]:8.2f} ms  {r['tflop_per_s']:6.1f} TFLOP/s  "
                  f"{100 * r['fraction_of_gemm_rate']:5.1f}% of GEMM  rel err {error:.2e}  first call {first_s:.1f} s"
                  f"{extra}", flush=True)
    return paths


def vision_row(name: str, grids: list[tuple[int, int, int]], device, rate: float, args) -> dict:
    config = VisionConfig.from_dict(V2_5.vision_config)
    torch.manual_seed(0)
    model = randomize(build_module(lambda: MiMoVisionTransformer(config), torch.bfloat16, device))
    grid_thw = torch.tensor(grids)
    num_patches = sum(math.prod(g) for g in grids)
    inputs = [torch.randn(num_patches, config.patch_dim, device=device) for _ in range(3)]

    def path(impl: str, compile_blocks: bool = True) -> Callable:
        def run(pixel_values):
            model.attention_impl, model.compile_blocks = impl, compile_blocks
            return model(pixel_values, grid_thw)
        return run

    flops = vision_flops(config, grids)
    with torch.no_grad():
        reference_out = path("reference")(inputs[0])
    fns = {"reference": path("reference"), "flex, eager blocks": path("flex", compile_blocks=False),
           "auto (flex, compiled blocks)": path("auto")}
    return {"row": name, "grids": grids, "tflop": flops / 1e12,
            "paths": measure(name, fns, inputs, flops, rate, args, reference_out)}


def audio_row(name: str, seconds: float, device, rate: float, args) -> dict:
    tok_config = AudioTokenizerConfig.from_dict(V2_5.audio_tokenizer_config)
    audio_config = AudioConfig.from_dict(V2_5.audio_config)
    torch.manual_seed(0)
    tokenizer = randomize(build_module(lambda: MiMoAudioTokenizer(tok_config), torch.bfloat16, device))
    tower = randomize(build_module(lambda: MiMoAudioEncoder(audio_config), torch.bfloat16, device))
    t_mel = 1 + int(seconds * tok_config.sampling_rate) // tok_config.hop_length
    inputs = [torch.randn(t_mel, tok_config.n_mels, device=device) for _ in range(3)]

    def path(impl: str, compile_layers: bool = True, compile_tower: bool = False) -> Callable:
        def run(mel):
            tokenizer.encoder.attention_impl, tokenizer.encoder.compile_layers = impl, compile_layers
            tower.compile_layers = compile_tower
            codes = tokenizer.encode_batch([mel], segment_size=audio_config.audio_segment_size)
            return tower.encode_batch(codes)[0]
        return run

    flops = audio_flops(tok_config, audio_config, t_mel)
    reference = path("reference", compile_layers=False)
    with torch.no_grad():
        reference_out = reference(inputs[0])
    fns = {"reference": reference, "flex, eager layers": path("flex", compile_layers=False),
           "auto (flex, compiled tokenizer)": path("auto")}
    row = {"row": name, "seconds": seconds, "tflop": flops / 1e12,
           "paths": measure(name, fns, inputs, flops, rate, args, reference_out, seconds)}
    # the codes feeding the tower may differ by near-ties of the RVQ argmin: compare the tokenizer features too
    with torch.no_grad():
        mel_lens = torch.tensor([t_mel], device=device)
        feats = {}
        for impl in ("reference", "auto"):
            tokenizer.encoder.attention_impl = impl
            feats[impl] = tokenizer.encoder.features(inputs[0][None], mel_lens)
        row["tokenizer_features_rel_err"] = relative_error(feats["auto"], feats["reference"])
        tokenizer.encoder.attention_impl = "auto"
        row["tokenizer_ms"] = time_ms(lambda mel: tokenizer.encode_batch([mel]), inputs, warmup=2, repeats=10)
        codes = [tokenizer.encode(mel) for mel in inputs]
        row["tower_ms"] = time_ms(lambda c: tower.encode_batch([c]), codes, warmup=2, repeats=10)
    processor = ProcessorConfig(tokens=SpecialTokenIds(*range(9)))
    waves = [torch.randn(int(seconds * processor.audio_sampling_rate), device=device) * 0.1 for _ in range(3)]
    row["log_mel_on_device_ms"] = time_ms(lambda w: log_mel_spectrogram(w, processor), waves, warmup=2, repeats=10)
    print(f"{name:10s} tokenizer {row['tokenizer_ms']:.2f} ms, tower {row['tower_ms']:.2f} ms, log-mel on the device "
          f"{row['log_mel_on_device_ms']:.2f} ms", flush=True)
    if args.profile:
        print(profile_table(path("auto"), inputs[0]), flush=True)
    row["paths"] |= measure(name, {"auto + compiled tower": path("auto", compile_tower=True)}, inputs, flops, rate,
                            args, reference_out, seconds)
    if args.cuda_graphs:
        # experiment: the same compiled regions as CUDA graphs (inductor's cudagraph trees, one per shape)
        tokenizer.encoder._compiled_transformer = torch.compile(
            tokenizer.encoder.transformer, dynamic=True, mode="reduce-overhead")
        tower._compiled_embed_groups = torch.compile(tower._embed_groups, dynamic=True, mode="reduce-overhead")
        try:
            row["paths"] |= measure(name, {"auto + CUDA graphs": path("auto", compile_tower=True)}, inputs, flops,
                                    rate, args, reference_out, seconds)
        except Exception as error:  # an experiment: report it, keep the measured rows
            print(f"CUDA graphs experiment failed: {error!r}"[:2000], flush=True)
            row["cuda_graphs_error"] = repr(error)[:2000]
    return row


def photo_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG (quality 90) of smooth colour gradients plus noise: decodes and resizes like a photo of that size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def v2_5_processor(directory: Path) -> MiMoProcessor:
    """A processor with the V2.5 preset's processor settings (and the tiny tokenizer: text does not matter here)."""
    config = hub_config(V2_5, num_layers=1, token_ids=write_tiny_tokenizer(directory), fp8=False, fused_qkv=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "audio_tokenizer").mkdir()
    (directory / "audio_tokenizer" / "config.json").write_text(json.dumps(V2_5.audio_tokenizer_config))
    return MiMoProcessor.from_checkpoint(directory)


def preprocess_row(name: str, args) -> dict:
    """`preprocess_request` of one user turn with a 1920x1080 JPEG: milliseconds on `--threads` CPU threads (the
    median of `--repeats` calls, after `--warmup`), and the bytes of every media tensor it ships to mimo_encoder."""
    torch.set_num_threads(args.threads)
    jpeg = photo_jpeg(1920, 1080)
    inputs = {"text_input": np.array([[b"What is in the picture?"]], dtype=np.object_),
              "image_bytes_input": np.array([[jpeg]], dtype=np.object_)}  # fmt: skip
    with tempfile.TemporaryDirectory() as directory:
        processor = v2_5_processor(Path(directory))
        max_model_len = 32768
        for _ in range(args.warmup):
            preprocess_request(processor, inputs, max_model_len)
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs = preprocess_request(processor, inputs, max_model_len)
            runs.append((time.perf_counter() - start) * 1e3)
    shipped = {tensor: int(outputs[tensor].nbytes) for tensor in PACKED_MEDIA_TENSORS}
    grid = outputs["grid_thw"].reshape(-1, 3)[0].tolist()
    resized_uint8 = 3 * grid[1] * grid[2] * processor.config.patch_size**2  # the resized RGB image, one byte a value
    row = {"row": name, "threads": args.threads, "jpeg_bytes": len(jpeg), "grid_thw": grid, "ms": runs,
           "median_ms": statistics.median(runs), "shipped_bytes": sum(shipped.values()),
           "shipped_bytes_per_tensor": {k: v for k, v in shipped.items() if v}, "resized_uint8_bytes": resized_uint8}
    print(f"{name:10s} preprocess_request {row['median_ms']:.1f} ms (median of {len(runs)}, {args.threads} thread(s)); "
          f"ships {row['shipped_bytes'] / 2**20:.2f} MiB = {row['shipped_bytes'] / resized_uint8:.1f}x the resized "
          f"uint8 image ({resized_uint8 / 2**20:.2f} MiB); grid {grid}, JPEG {len(jpeg) / 2**10:.0f} KiB", flush=True)
    return row


def wall_ms(fn: Callable, device: torch.device, *, warmup: int, repeats: int) -> tuple[list[float], object]:
    """Wall-clock milliseconds of each of `repeats` calls of fn() after `warmup` (the device synchronised at both
    ends of each call), and the last result."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        runs.append((time.perf_counter() - start) * 1e3)
    return runs, result


def split_row(name: str, args) -> dict:
    """One 1920x1080 JPEG at V2.5 processor settings, from its bytes to the vision tower's input (patches in the
    encoder's dtype on its device), three ways in the same run, `--threads` CPU threads:

    - `pre-split (CPU)`: what preprocessing did before the split (decode, resize, normalise, patchify on the CPU:
      `preprocess_image`, the same ops), the copy into the packed float32 wire, and the copy to the device;
    - `split (CPU decode)`: preprocessing's side (PIL decode, pack the uint8 frame), then mimo_encoder's (unpack,
      the frame to the device, `vision_patches` there);
    - `split (nvJPEG)` where torchvision's CUDA JPEG decoder is there: preprocessing ships the JPEG (header read),
      mimo_encoder decodes it on the device and makes the patches there.

    Each split path also reports its two sides separately and the largest difference of its patches from the
    pre-split ones (0 on the CPU)."""
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    jpeg = photo_jpeg(1920, 1080)
    part = MediaPart(Modality.IMAGE, jpeg)
    with tempfile.TemporaryDirectory() as directory:
        config = v2_5_processor(Path(directory)).config

    def pre_split():
        pixel_values, _ = preprocess_image(jpeg, config)
        return torch.from_numpy(pixel_values.numpy().copy()).to(device, dtype)

    def preprocessing_side(jpeg_to_encoder: bool):
        return lambda: pack_items([preprocess_media(part, config, jpeg_to_encoder=jpeg_to_encoder)])

    def encoder_side(packed):
        def run():
            (item,) = unpack_items(packed)
            if item.jpeg is not None:
                (frames,) = decode_jpeg_frames([item.jpeg], device, config)
            else:
                frames = frames_of(item.frames, item.frame_shape).to(device)
            return vision_patches(frames, item.grid_thw, config).to(dtype)
        return run

    timing = {"warmup": args.warmup, "repeats": args.repeats}
    runs, reference = wall_ms(pre_split, device, **timing)
    paths = {"pre-split (CPU)": {"ms": runs, "median_ms": statistics.median(runs)}}
    ways = {"split (CPU decode)": False}
    if device.type == "cuda" and nvjpeg_available():
        ways["split (nvJPEG)"] = True
    for label, jpeg_to_encoder in ways.items():
        cpu_runs, packed = wall_ms(preprocessing_side(jpeg_to_encoder), device, **timing)
        device_runs, _ = wall_ms(encoder_side(packed), device, **timing)
        both = preprocessing_side(jpeg_to_encoder)
        runs, patches = wall_ms(lambda: encoder_side(both())(), device, **timing)
        paths[label] = {"ms": runs, "median_ms": statistics.median(runs),
                        "preprocessing_median_ms": statistics.median(cpu_runs),
                        "encoder_median_ms": statistics.median(device_runs),
                        "shipped_bytes": sum(int(array.nbytes) for array in packed.values()),
                        "max_abs_diff": float((patches.float() - reference.float()).abs().max())}
    print(f"{name:10s} one 1920x1080 JPEG to vision-tower input on {device} ({dtype}), {args.threads} thread(s):",
          flush=True)
    for label, path in paths.items():
        extra = ""
        if "shipped_bytes" in path:
            extra = (f" = preprocessing {path['preprocessing_median_ms']:.1f} + encoder {path['encoder_median_ms']:.1f}"
                     f" ms; ships {path['shipped_bytes'] / 2**20:.2f} MiB; max |patch - pre-split| "
                     f"{path['max_abs_diff']:.2e}")
        print(f"{'':10s} {label:20s} {path['median_ms']:7.1f} ms{extra}", flush=True)
    return {"row": name, "device": str(device), "dtype": str(dtype), "threads": args.threads, "paths": paths,
            "pre_split_shipped_bytes": reference.numel() * 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--cuda-graphs", action="store_true", help="audio: also time the compiled regions as CUDA graphs")
    parser.add_argument("--profile", action="store_true", help="audio: print a torch.profiler table of one call")
    parser.add_argument("--threads", type=int, default=1, help="preprocess1080, split1080: torch CPU threads")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    rows = args.rows.split(",")
    if unknown := set(rows) - set(ROWS):
        parser.error(f"unknown rows {sorted(unknown)}; known: {ROWS}")
    result = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime()), "rows": []}
    if set(rows) - set(CPU_ROWS):
        if not torch.cuda.is_available():
            raise SystemExit(f"bench_encoders needs a CUDA device for the rows other than {CPU_ROWS}")
        device = torch.device("cuda")
        rate = gemm_rate(device)
        result |= {"device": torch.cuda.get_device_name(), "gemm_tflop_per_s": rate / 1e12}
        print(f"bf16 GEMM 8192^3: {rate / 1e12:.0f} TFLOP/s on {result['device']}", flush=True)
    for name in rows:
        if name == "preprocess1080":
            row = preprocess_row(name, args)
        elif name == "split1080":
            row = split_row(name, args)
        elif name == "vit1080":
            row = vision_row(name, [(1, 68, 120)], device, rate, args)
        elif name == "vit8x1024":
            row = vision_row(name, [(1, 64, 64)] * 8, device, rate, args)
        else:
            row = audio_row(name, 30.0, device, rate, args)
        result["rows"].append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
