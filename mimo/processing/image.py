"""Images -> vision-tower inputs (ref §5.3): decode, smart_resize, normalise, patchify.

Preprocessing decodes (`decode_image`: uint8 frames, or a JPEG left for the encoder: `jpeg_on_encoder`);
mimo_encoder turns the frames into patches on its device (`vision_patches`: resize, normalise, temporal repeat,
patchify), shared with video frames. `preprocess_image` is both in one process.
"""

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from mimo.processing.config import ProcessorConfig
from mimo.processing.errors import MediaDecodeError, MediaLimitError, ProcessingError

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
    """uint8 [T, 3, H, W] -> float32 [T, 3, h, w] on the frames' device: bilinear on 0..255 values, then
    (x - mean) / std."""
    pixels = frames.float()
    if tuple(pixels.shape[-2:]) != size:
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    mean = torch.tensor(config.image_mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def vision_patches(frames: torch.Tensor, grid_thw: torch.Tensor, config: ProcessorConfig) -> torch.Tensor:
    """Decoded frames uint8 [n, 3, H, W] of one image or video -> its pixel_values [t*gh*gw, C*tp*p*p] float32, on
    the frames' device: resized to the grid's size, normalised, the last frame repeated to t*tp frames (an image to
    temporal_patch_size copies), patchified. On the CPU exactly what preprocessing computed before the frames were
    shipped (the same torch ops in the same order)."""
    grid_t, grid_h, grid_w = (int(v) for v in grid_thw.reshape(-1))
    frames_needed = grid_t * config.temporal_patch_size
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise ProcessingError(f"frames must be uint8 [n, 3, H, W], got {frames.dtype} {list(frames.shape)}")
    if not 0 < frames.shape[0] <= frames_needed or frames_needed - frames.shape[0] >= config.temporal_patch_size:
        raise ProcessingError(f"{frames.shape[0]} frames cannot make grid_thw {[grid_t, grid_h, grid_w]} "
                              f"({frames_needed} frames, the last repeated fewer than {config.temporal_patch_size} "
                              "times)")  # fmt: skip
    size = (grid_h * config.patch_size, grid_w * config.patch_size)
    # frame by frame, as preprocessing resized a video's frames: float32 copies of one source frame at a time
    resized = torch.cat([resize_and_normalize(frame.unsqueeze(0), size, config) for frame in frames])
    resized = torch.cat([resized, resized[-1:].expand(frames_needed - frames.shape[0], -1, -1, -1)])
    return patchify(resized, config)[0]


def frames_of(flat: torch.Tensor, frame_shape: torch.Tensor) -> torch.Tensor:
    """The `frames` wire field of one item (uint8, flattened) -> [n, 3, H, W] by its `frame_shape` [1, 3]."""
    n, height, width = (int(v) for v in frame_shape.reshape(-1))
    if min(n, height, width) < 1 or flat.numel() != n * 3 * height * width:
        raise ProcessingError(f"frames hold {flat.numel()} values, frame_shape {[n, height, width]} needs "
                              f"n x 3 x H x W = {max(n, 0) * 3 * height * width}")  # fmt: skip
    return flat.view(n, 3, height, width)


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


def decoded_grid(height: int, width: int, config: ProcessorConfig) -> torch.Tensor:
    """grid_thw [1, 3] of an image decoded to `height` x `width` pixels."""
    h, w = image_size(height, width, config)
    return torch.tensor([[1, h // config.patch_size, w // config.patch_size]], dtype=torch.long)


def preprocess_image(data: bytes, config: ProcessorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded image -> (pixel_values [N, 1536] float32, grid_thw [1, 3]); the image is repeated to T=2."""
    image = decode_image(data, max_source_pixels=config.max_source_pixels)
    grid_thw = decoded_grid(image.shape[1], image.shape[2], config)
    return vision_patches(image.unsqueeze(0), grid_thw, config), grid_thw


def jpeg_on_encoder(data: bytes, config: ProcessorConfig) -> tuple[int, int] | None:
    """(H, W) when this encoded image may travel to mimo_encoder undecoded, for nvJPEG there: a JPEG that PIL reads
    as 8-bit RGB or grayscale with no EXIF orientation to apply (what nvJPEG's RGB output shows the same way, up to
    its IDCT's rounding); None for anything else, which preprocessing decodes. Only the header is read."""
    image = open_image(data, max_source_pixels=config.max_source_pixels)
    progressive = "progressive" in image.info or "progression" in image.info
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or "transparency" in image.info or progressive:
        return None
    if Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1) != 1:
        return None
    width, height = image.size
    return height, width


def decode_jpeg_frames(jpegs: list[torch.Tensor], device: torch.device, config: ProcessorConfig) -> list[torch.Tensor]:
    """The encoded JPEGs of `jpeg_on_encoder` images (uint8 [bytes], host memory) -> uint8 [1, 3, H, W] each, on
    `device`: one batched nvJPEG call (torchvision) on a CUDA device where torchvision has it, else PIL, exactly
    as `decode_image`."""
    if jpegs and device.type == "cuda" and nvjpeg_available():
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return [image.unsqueeze(0) for image in decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device)]
        except RuntimeError:  # a JPEG nvJPEG refuses: PIL decodes them, or names the one that is corrupt
            pass
    decoded = [decode_image(jpeg.numpy().tobytes(), max_source_pixels=config.max_source_pixels) for jpeg in jpegs]
    return [image.unsqueeze(0).to(device) for image in decoded]


def nvjpeg_available() -> bool:
    """Whether torchvision's CUDA JPEG decoder (`torchvision.io.decode_jpeg(device="cuda")`) can run here."""
    if not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True
