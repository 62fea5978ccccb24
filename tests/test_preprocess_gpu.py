"""The media split on a GPU encoder (skipped without CUDA): resize / normalise / patchify on the device, and nvJPEG
where torchvision has it, against the CPU path (which equals the pre-split preprocessing bit for bit:
tests/test_preprocess_split.py). Run: python -m pytest -q tests/test_preprocess_gpu.py"""

import dataclasses

import pytest
import torch

from mimo.processing.image import decode_jpeg_frames, frames_of, nvjpeg_available, vision_patches
from mimo.processing.processor import MiMoProcessor
from mimo.serving.encode import PromptTableEncoder, load_multimodal_encoder, unpack_request
from test_preprocess_split import IMAGES, VIDEOS, RecordingEncoder, jpeg, photo, shipped, vision_table_errors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
JPEGS = ("jpeg_1920x1080", "jpeg_1001x517", "jpeg_gray_300x200")


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    """V2.5's image budget (1920x1080 kept at 1920x1088)."""
    tiny = MiMoProcessor.from_checkpoint(tiny_checkpoint)
    config = dataclasses.replace(tiny.config, image_max_pixels=4096 * 32 * 32)
    return MiMoProcessor(tiny.tokenizer, config, model_type=tiny.model_type, vocab_size=tiny.vocab_size)


def patches_on(device: torch.device, processor, packed) -> torch.Tensor:
    (item,) = unpack_request(packed)
    grid = item.grid_thw if item.grid_thw is not None else item.video_grid_thw
    return vision_patches(frames_of(item.frames, item.frame_shape).to(device), grid, processor.config)


@pytest.mark.parametrize("kind,name", [("image_bytes_input", n) for n in IMAGES] +
                                      [("video_bytes_input", n) for n in VIDEOS])  # fmt: skip
def test_device_patches_equal_the_cpu_patches_within_float32_rounding(processor, kind, name):
    packed = shipped(processor, kind, (IMAGES | VIDEOS)[name])
    cpu, gpu = patches_on(torch.device("cpu"), processor, packed), patches_on(CUDA, processor, packed)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32 and gpu.shape == cpu.shape
    # one 0..255 level is 1/57 after normalisation; the CUDA bilinear kernel differs from the CPU one by float32 ulps
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)


@pytest.mark.skipif(not nvjpeg_available(), reason="torchvision's CUDA decode_jpeg is not importable")
@pytest.mark.parametrize("name", JPEGS)
def test_nvjpeg_frames_are_within_a_few_levels_of_pil(processor, name):
    """nvJPEG's IDCT and chroma upsampling are not libjpeg's: torchvision's own bound against its CPU decoder, a mean
    absolute difference under 2 levels."""
    packed = shipped(processor, "image_bytes_input", IMAGES[name], jpeg_to_encoder=True)
    (item,) = unpack_request(packed)
    (nv,) = decode_jpeg_frames([item.jpeg], CUDA, processor.config)
    (pil,) = decode_jpeg_frames([item.jpeg], torch.device("cpu"), processor.config)
    assert nv.device.type == "cuda" and nv.shape == pil.shape and nv.dtype == torch.uint8
    difference = (nv.cpu().int() - pil.int()).abs()
    assert difference.float().mean() < 2, (int(difference.max()), float(difference.float().mean()))


@pytest.mark.skipif(not nvjpeg_available(), reason="torchvision's CUDA decode_jpeg is not importable")
def test_nvjpeg_decodes_grayscale_as_rgb(processor):
    gray = jpeg(photo(64, 48)[..., 0])
    packed = shipped(processor, "image_bytes_input", gray, jpeg_to_encoder=True)
    (item,) = unpack_request(packed)
    (nv,) = decode_jpeg_frames([item.jpeg], CUDA, processor.config)
    (pil,) = decode_jpeg_frames([item.jpeg], torch.device("cpu"), processor.config)
    assert nv.shape == pil.shape == (1, 3, 48, 64)
    assert (nv.cpu().int() - pil.int()).abs().float().mean() < 2


def with_frames_decoded_on_the_gpu(item, processor):
    """An item shipped as a JPEG -> the same item shipped as nvJPEG's frames (host memory)."""
    if item.jpeg is None:
        return item
    (frames,) = decode_jpeg_frames([item.jpeg], CUDA, processor.config)
    return dataclasses.replace(item, jpeg=None, frames=frames.cpu().reshape(-1))


@pytest.mark.parametrize("jpeg_to_encoder", [False, True])
def test_gpu_encoder_tables_match_the_cpu_path(tiny_checkpoint, processor, jpeg_to_encoder):
    """The served encoder on the GPU in bf16 (frames or JPEGs in, patches made on the device) against the CPU
    float32 path: every image's and video's vision rows within bf16 tolerance. A video's sound rows come from
    discrete audio codes that bf16 flips on near-ties (vision_table_errors); they must be the GPU towers' own rows
    for its sound track (the towers against float32: tests/test_encoder_kernels_gpu.py)."""
    if jpeg_to_encoder and not nvjpeg_available():
        pytest.skip("torchvision's CUDA decode_jpeg is not importable")
    videos = [unpack_request(shipped(processor, "video_bytes_input", VIDEOS[name])) for name in VIDEOS]
    requests_cpu = [unpack_request(shipped(processor, "image_bytes_input", IMAGES[name])) for name in IMAGES] + videos
    requests_gpu = [unpack_request(shipped(processor, "image_bytes_input", IMAGES[name],
                                           jpeg_to_encoder=jpeg_to_encoder)) for name in IMAGES] + videos  # fmt: skip
    if jpeg_to_encoder:  # the CPU path on nvJPEG's pixels (nvJPEG against PIL: the tests above)
        requests_cpu = [[with_frames_decoded_on_the_gpu(item, processor) for item in request]
                        for request in requests_gpu]  # fmt: skip
    cpu = PromptTableEncoder(load_multimodal_encoder(tiny_checkpoint, torch.float32, torch.device("cpu")),
                             processor.config).encode(requests_cpu)  # fmt: skip
    towers = RecordingEncoder(load_multimodal_encoder(tiny_checkpoint, torch.bfloat16, CUDA))
    gpu = PromptTableEncoder(towers, processor.config).encode(requests_gpu)
    assert all(pixels.device.type == "cuda" for pixels in towers.pixels)
    assert all(not isinstance(table, Exception) and table.device.type == "cuda" for table in gpu), gpu
    for name, error in zip([*IMAGES, *VIDEOS], vision_table_errors(requests_cpu, cpu, gpu), strict=True):
        assert error < 0.05, (name, error)  # bf16 weights and activations through the tower
    with_sound = list(VIDEOS).index("sound_640x360")
    (video,) = videos[with_sound]
    sound = towers.encode_video_audio(video.mel.to(CUDA, torch.bfloat16), video.segment_starts, video.segment_lens)
    got = gpu[len(IMAGES) + with_sound][-sound.shape[0]:]
    assert (got.float() - sound.float()).abs().max() <= 1e-2 * sound.float().abs().max()
    if jpeg_to_encoder:
        assert any(item.jpeg is not None for request in requests_gpu for item in request)
