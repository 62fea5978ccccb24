"""Image preprocessing: decode (formats, EXIF, alpha), smart_resize, parity with transformers' Qwen2-VL
image processor, patch order, limits and errors.

Where MiMo's rules differ from transformers' Qwen2-VL processor, the tests pin the difference:
* resampling: MiMo resizes with torch bilinear (align_corners=False, no antialias) on 0..255 floats,
  transformers with PIL bicubic on uint8 -> pixel values agree only within a resampling tolerance, and
  exactly when no resize happens;
* a side shorter than 32 px: MiMo first scales the image up so that side is 32, transformers rounds it;
* normalisation constants: MiMo uses ImageNet mean/std on the 0..255 scale; the parity tests give the
  transformers processor the same constants (its defaults are CLIP's).
"""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from mimo.processing.config import ProcessorConfig, SpecialTokenIds
from mimo.processing.errors import MediaDecodeError, MediaLimitError
from mimo.processing.image import decode_image, patchify, preprocess_image, smart_resize
from processing_media import encode_image, gradient_rgb, with_exif_orientation

CONFIG = ProcessorConfig(tokens=SpecialTokenIds(*range(9)))
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def qwen2vl_processor(config: ProcessorConfig) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2,
        image_mean=[m / 255 for m in config.image_mean], image_std=[s / 255 for s in config.image_std],
        size={"shortest_edge": config.image_min_pixels, "longest_edge": config.image_max_pixels},
    )


@pytest.mark.parametrize("width,height,max_tokens", [
    (64, 96, 4096),  # already a multiple of 32: no resize
    (100, 70, 4096),
    (320, 240, 4096),
    (33, 500, 4096),
    (640, 480, 64),  # downscaled to the token budget
])
def test_matches_transformers_qwen2vl_image_processor(width, height, max_tokens):
    config = ProcessorConfig(tokens=CONFIG.tokens, image_max_pixels=max_tokens * 32 * 32)
    image = Image.fromarray(gradient_rgb(width, height))
    theirs = qwen2vl_processor(config)(images=[image], return_tensors="pt")
    pixel_values, grid_thw = preprocess_image(encode_image(image, "PNG"), config)
    assert grid_thw.tolist() == theirs["image_grid_thw"].tolist()
    assert pixel_values.shape == theirs["pixel_values"].shape == (int(grid_thw.prod()), 1536)
    diff = (pixel_values - theirs["pixel_values"]).abs()
    if (width, height) == (64, 96):
        assert diff.max() < 1e-5
    else:  # bilinear vs bicubic, in normalised units (1/58 of a grey level ~ 0.017)
        assert diff.mean() < 0.02 and diff.max() < 0.3


def test_smart_resize_agrees_with_transformers_for_sides_of_32_and_more():
    rng = np.random.default_rng(0)
    for height, width in rng.integers(32, 5000, size=(300, 2)).tolist():
        if max(height, width) / min(height, width) > 200:
            continue
        for min_pixels, max_pixels in ((4 * 1024, 4096 * 1024), (256 * 1024, 1024 * 1024)):
            ours = smart_resize(height, width, factor=32, min_pixels=min_pixels, max_pixels=max_pixels)
            assert ours == hf_smart_resize(height, width, factor=32, min_pixels=min_pixels, max_pixels=max_pixels)
            assert ours[0] % 32 == 0 and ours[1] % 32 == 0
            assert min_pixels <= ours[0] * ours[1] <= max_pixels


def test_short_side_is_scaled_up_to_32_first():
    assert smart_resize(20, 1000, factor=32, min_pixels=4096, max_pixels=4096 * 1024) == (32, 1600)
    assert hf_smart_resize(20, 1000, factor=32, min_pixels=4096, max_pixels=4096 * 1024) == (32, 992)  # differs
    assert smart_resize(1, 1, factor=32, min_pixels=4096, max_pixels=4096 * 1024) == (64, 64)


def test_token_count_example_of_the_reference():
    _, grid = preprocess_image(encode_image(Image.new("RGB", (1024, 1024)), "PNG"), CONFIG)
    assert grid.tolist() == [[1, 64, 64]] and int(grid.prod()) // 4 == 1024


def test_aspect_ratio_limit():
    assert smart_resize(32, 6400, factor=32, min_pixels=4096, max_pixels=1 << 30) == (32, 6400)  # exactly 200
    with pytest.raises(MediaLimitError, match="aspect ratio 201.0"):
        smart_resize(32, 6432, factor=32, min_pixels=4096, max_pixels=1 << 30)
    with pytest.raises(MediaLimitError, match="aspect ratio"):
        preprocess_image(encode_image(Image.new("RGB", (2010, 10)), "PNG"), CONFIG)


def two_color(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2:] = BLUE
    return Image.fromarray(pixels)


def near(pixel: torch.Tensor, color: tuple[int, int, int], tol: int = 40) -> bool:
    return bool((pixel.int() - torch.tensor(color)).abs().max() <= tol)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_decodes_every_accepted_format(fmt):
    decoded = decode_image(encode_image(two_color(), fmt), max_source_pixels=10**6)
    assert decoded.shape == (3, 20, 40) and decoded.dtype == torch.uint8
    assert near(decoded[:, 10, 5], RED) and near(decoded[:, 10, 35], BLUE)


def test_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    data = encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert near(decode_image(data, max_source_pixels=10**6)[:, 8, 8], RED, tol=0)


@pytest.mark.parametrize("orientation,shape,red_at,blue_at", [
    (1, (20, 40), (10, 5), (10, 35)),
    (3, (20, 40), (10, 35), (10, 5)),  # rotated 180
    (6, (40, 20), (5, 10), (35, 10)),  # stored rotated; displayed 90 degrees clockwise
    (8, (40, 20), (35, 10), (5, 10)),
])
def test_exif_orientation_is_applied(orientation, shape, red_at, blue_at):
    decoded = decode_image(with_exif_orientation(two_color(), orientation), max_source_pixels=10**6)
    assert tuple(decoded.shape[1:]) == shape
    assert near(decoded[:, red_at[0], red_at[1]], RED) and near(decoded[:, blue_at[0], blue_at[1]], BLUE)


def test_alpha_is_composited_on_white():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[:, 4:] = (255, 0, 0, 128)  # half transparent red -> pink
    decoded = decode_image(encode_image(Image.fromarray(rgba, "RGBA"), "PNG"), max_source_pixels=10**6)
    assert decoded[:, 0, 0].tolist() == [255, 255, 255]
    assert near(decoded[:, 0, 7], (255, 127, 127), tol=1)
    la = Image.fromarray(np.stack([np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)], -1), "LA")
    assert decode_image(encode_image(la, "PNG"), max_source_pixels=10**6)[:, 0, 0].tolist() == [255, 255, 255]


def test_palette_transparency_is_composited_on_white():
    palette_image = Image.new("P", (8, 8), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_image.paste(1, (4, 0, 8, 8))
    data = encode_image(palette_image, "PNG", transparency=0)
    decoded = decode_image(data, max_source_pixels=10**6)
    assert decoded[:, 0, 0].tolist() == [255, 255, 255] and decoded[:, 0, 7].tolist() == [255, 0, 0]
    opaque = decode_image(encode_image(palette_image, "GIF"), max_source_pixels=10**6)
    assert opaque[:, 0, 0].tolist() == [0, 0, 0]


def test_normalisation_uses_imagenet_constants_on_0_255():
    pixel_values, _ = preprocess_image(encode_image(Image.new("RGB", (64, 64), (200, 100, 50)), "PNG"), CONFIG)
    expected = [(200 - 123.675) / 58.395, (100 - 116.28) / 57.12, (50 - 103.53) / 57.375]
    per_channel = pixel_values.reshape(-1, 3, 512)  # rows are (C, T, kh, kw)
    for channel, value in enumerate(expected):
        torch.testing.assert_close(per_channel[:, channel], torch.full_like(per_channel[:, channel], value))


def test_patch_rows_follow_conv3d_layout_and_merge_order():
    config = CONFIG
    t, c, h, w, p, m = 4, 3, 64, 96, 16, 2
    frames = torch.arange(t * c * h * w, dtype=torch.float32).reshape(t, c, h, w)
    pixel_values, grid = patchify(frames, config)
    assert grid.tolist() == [[2, 4, 6]] and pixel_values.shape == (2 * 4 * 6, c * 2 * p * p)
    row = 0
    for gt in range(2):
        for bh in range(4 // m):
            for bw in range(6 // m):
                for mh in range(m):
                    for mw in range(m):
                        y, x = (bh * m + mh) * p, (bw * m + mw) * p
                        expected = frames[gt * 2:gt * 2 + 2, :, y:y + p, x:x + p].permute(1, 0, 2, 3)  # (C, T, kh, kw)
                        assert torch.equal(pixel_values[row], expected.reshape(-1))
                        row += 1


def test_image_is_duplicated_over_the_temporal_patch():
    pixel_values, _ = preprocess_image(encode_image(Image.fromarray(gradient_rgb(64, 32)), "PNG"), CONFIG)
    per_frame = pixel_values.reshape(-1, 3, 2, 256)
    assert torch.equal(per_frame[:, :, 0], per_frame[:, :, 1])


def tiny_png_claiming(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("data,error,message", [
    (b"", MediaDecodeError, "empty"),
    (b"not an image at all" * 10, MediaDecodeError, "not a supported image"),
    (encode_image(Image.new("RGB", (8, 8)), "TIFF"), MediaDecodeError, "not a supported image"),
    (encode_image(Image.fromarray(gradient_rgb(64, 64)), "JPEG")[:400], MediaDecodeError, "corrupt or truncated"),
    (encode_image(Image.fromarray(gradient_rgb(64, 64)), "JPEG")[:-10], MediaDecodeError, "corrupt or truncated JPEG"),
    (encode_image(Image.fromarray(gradient_rgb(64, 64)), "PNG")[:200], MediaDecodeError, "corrupt or truncated PNG"),
    (tiny_png_claiming(50_000, 50_000), MediaLimitError, "decompression bomb"),
], ids=["empty", "garbage", "tiff", "truncated-header", "truncated-data", "png-data-cut", "pil-bomb"])
def test_bad_images_raise_clear_errors(data, error, message):
    with pytest.raises(error, match=message):
        preprocess_image(data, CONFIG)


def test_pixel_cap_applies_before_decoding():
    config = ProcessorConfig(tokens=CONFIG.tokens, max_source_pixels=10_000)
    with pytest.raises(MediaLimitError, match="200x100 = 20000 pixels, over the 10000 limit"):
        preprocess_image(tiny_png_claiming(200, 100), config)
