"""Images -> vision-tower inputs (ref §5.3): decode, smart_resize, normalise, patchify.

The resize/normalise/patchify helpers are shared with video frames.
"""

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from mimo.processing.config import ProcessorConfig
from mimo.processing.errors import MediaDecodeError, MediaLimitError

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
MAX_ASPECT_RATIO = 200
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations whose exif_transpose swaps width and height


def open_image(data: bytes, *, max_source_pixels: int) -> Image.Image:
    """Open an encoded image lazily (PIL reads the header, no pixel is decoded) and check its declared size."""
    if not data:
        raise MediaDecodeError("image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise MediaLimitError(f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise MediaDecodeError(f"not a supported image (accepted: {', '.join(IMAGE_FORMATS)})") from exc
    except Exception as exc:  # PIL's plugins raise many exception types on malformed headers
        raise MediaDecodeError(f"corrupt or truncated image: {exc}") from exc
    # PIL itself refuses only above 2x Image.MAX_IMAGE_PIXELS; our cap applies before any pixel is decoded.
    width, height = image.size
    if width * height > max_source_pixels:
        raise MediaLimitError(
            f"image is {width}x{height} = {width * height} pixels, over the {max_source_pixels} limit"
        )
    return image


def decode_image(data: bytes, *, max_source_pixels: int) -> torch.Tensor:
    """Decode an encoded image to RGB uint8 [3, H, W]: first frame, EXIF orientation applied, alpha on white."""
    image = open_image(data, max_source_pixels=max_source_pixels)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as exc:
        raise MediaDecodeError(f"corrupt or truncated {image.format} image: {exc}") from exc
    return torch.from_numpy(_to_rgb_array(image)).permute(2, 0, 1).contiguous()


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    # "transparency" covers palette images and single-colour keys of RGB / L images
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if not has_alpha:
        return np.array(image.convert("RGB"))
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.array(Image.alpha_composite(white, rgba).convert("RGB"))


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (h, w), multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept (ref §5.3)."""
    if height <= 0 or width <= 0:
        raise MediaDecodeError(f"image has no pixels ({width}x{height})")
    aspect_ratio = max(height, width) / min(height, width)
    if aspect_ratio > MAX_ASPECT_RATIO:
        raise MediaLimitError(f"aspect ratio {aspect_ratio:.1f} of a {width}x{height} image is over {MAX_ASPECT_RATIO}")
    if min(height, width) < factor:
        scale = factor / min(height, width)
        height, width = height * scale, width * scale
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_and_normalize(frames: torch.Tensor, size: tuple[int, int], config: ProcessorConfig) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> float32 [T, 3, h, w]: bilinear on 0..255 values, then (x - mean) / std."""
    pixels = frames.float()
    if tuple(pixels.shape[-2:]) != size:
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    return (pixels - mean) / std


def patchify(frames: torch.Tensor, config: ProcessorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, C, h, w] (T a multiple of temporal_patch_size) -> (pixel_values [t*gh*gw, C*tp*p*p], grid_thw [1, 3]).

    Rows are ordered frame-group, then 2x2 merge block (row-major), then patch inside the block; each row
    is (C, T, kh, kw), the Conv3d patch-embed layout (ref §5.2).
    """
    num_frames, channels, height, width = frames.shape
    tp, p, m = config.temporal_patch_size, config.patch_size, config.merge_size
    grid_t, grid_h, grid_w = num_frames // tp, height // p, width // p
    patches = frames.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
    # [gt, gh/m, gw/m, m, m, C, tp, p, p]
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p).contiguous()
    return pixel_values, torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.long)


def image_size(height: int, width: int, config: ProcessorConfig) -> tuple[int, int]:
    """The (h, w) an image of `height` x `width` pixels is resized to."""
    return smart_resize(height, width, factor=config.image_factor, min_pixels=config.image_min_pixels,
                        max_pixels=config.image_max_pixels)  # fmt: skip


def image_grid(data: bytes, config: ProcessorConfig) -> tuple[int, int, int]:
    """The exact `grid_thw` row `preprocess_image` gives an encoded image, from its header alone (no pixel decoded).

    The size is the header's, width and height swapped for an EXIF orientation that transposes (read as
    `ImageOps.exif_transpose` reads it, EXIF or XMP, but only from what the header holds: a PNG's eXIf chunk after
    its pixel data is not seen, and its grid then comes out transposed; the token count never changes, since
    smart_resize is symmetric).
    """
    image = open_image(data, max_source_pixels=config.max_source_pixels)
    width, height = image.size
    # Image.getexif itself, not a plugin's override: PNG's loads the whole image to look past the pixel data
    if Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1) in TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    h, w = image_size(height, width, config)
    return 1, h // config.patch_size, w // config.patch_size  # T = temporal_patch_size copies: one frame group


def image_tokens(data: bytes, config: ProcessorConfig) -> int:
    """The exact token count of an encoded image from its header alone, without decoding it."""
    grid_t, grid_h, grid_w = image_grid(data, config)
    return grid_t * grid_h * grid_w // config.merge_size**2


def preprocess_image(data: bytes, config: ProcessorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded image -> (pixel_values [N, 1536] float32, grid_thw [1, 3]); the image is repeated to T=2."""
    image = decode_image(data, max_source_pixels=config.max_source_pixels)
    frames = resize_and_normalize(image.unsqueeze(0), image_size(image.shape[1], image.shape[2], config), config)
    return patchify(frames.expand(config.temporal_patch_size, -1, -1, -1), config)
