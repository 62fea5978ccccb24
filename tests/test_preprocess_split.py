"""The media split: preprocessing ships decoded uint8 frames (or a JPEG), mimo_encoder makes the patches on its
device. On the CPU the patches the vision tower receives must be bit for bit what preprocessing computed before
the split (`todays_*_patches` below: the pre-split code, decode -> resize -> normalise -> repeat -> patchify in one
process), for every size, through the real pack / unpack and PromptTableEncoder path."""

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from builders.repository import RepositorySettings, render_repository
from mimo.processing.errors import ProcessingError
from mimo.processing.image import (
    decode_image, frames_of, image_size, jpeg_on_encoder, patchify, resize_and_normalize, vision_patches,
)
from mimo.processing.items import PACKED_MEDIA_TENSORS
from mimo.processing.processor import MiMoProcessor
from mimo.processing.video import decode_video
from mimo.serving.encode import PromptTableEncoder, load_multimodal_encoder, unpack_request
from mimo.serving.preprocess import preprocess_request
from processing_media import encode_image, encode_video, gradient_rgb, with_exif_orientation

MAX_MODEL_LEN = 1 << 20


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Gradients plus noise: resizes with fractional values everywhere, as a photo does."""
    rng = np.random.default_rng(seed)
    base = gradient_rgb(width, height).astype(np.int64)
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, **save_args)
    return buffer.getvalue()


IMAGES = {
    "jpeg_1920x1080": jpeg(photo(1920, 1080)),
    "jpeg_1001x517": jpeg(photo(1001, 517, seed=1)),
    "png_64x32": encode_image(Image.fromarray(gradient_rgb(64, 32)), "PNG"),
    "png_rgba_90x60": encode_image(Image.fromarray(photo(90, 60)).convert("RGBA"), "PNG"),
    "jpeg_exif_rotated": with_exif_orientation(Image.fromarray(photo(120, 50, seed=2)), 6),
    "png_tiny_upscaled": encode_image(Image.fromarray(photo(10, 7, seed=3)), "PNG"),
    "jpeg_gray_300x200": jpeg(photo(300, 200, seed=4)[..., 1]),
    "jpeg_progressive_200x300": jpeg(photo(200, 300, seed=5), progressive=True),
}
TRAVEL_AS_JPEG = ("jpeg_1920x1080", "jpeg_1001x517", "jpeg_gray_300x200")  # not rotated, not progressive, not PNG
VIDEOS = {"silent_96x64": encode_video(2.0, 8, sound_rate=None), "sound_640x360": encode_video(1.0, 6, width=640,
                                                                                               height=360)}


def todays_image_patches(data: bytes, config) -> torch.Tensor:
    """preprocess_image before the split."""
    image = decode_image(data, max_source_pixels=config.max_source_pixels)
    frames = resize_and_normalize(image.unsqueeze(0), image_size(image.shape[1], image.shape[2], config), config)
    return patchify(frames.expand(config.temporal_patch_size, -1, -1, -1), config)[0]


def todays_video_patches(data: bytes, config) -> torch.Tensor:
    """preprocess_video before the split: each sampled frame resized as it was decoded, the last resized frame
    repeated to whole temporal groups, patchified."""
    video = decode_video(data, config)
    _, grid_h, grid_w = video.video_grid_thw[0].tolist()
    size = (grid_h * config.patch_size, grid_w * config.patch_size)
    frames = torch.cat([resize_and_normalize(frame.unsqueeze(0), size, config) for frame in video.frames])
    missing = int(video.video_grid_thw[0, 0]) * config.temporal_patch_size - frames.shape[0]
    return patchify(torch.cat([frames, frames[-1:].expand(missing, -1, -1, -1)]), config)[0]


def vision_table_errors(requests, want, got) -> list[float]:
    """Requests of one image or video each, their tables from two encoders -> per request max |got - want| over
    max |want| on the vision rows: what the media split changes. A video's sound rows (after its vision rows) come
    from the audio tokenizer's nearest codewords, which flip on near-ties when the features move by less than bf16
    rounding, and a flipped code moves its rows by a large fraction of the table: those rows are not comparable
    within a tolerance (test_a_bf16_table_comparison_leaves_out_the_sound_rows)."""
    errors = []
    for (item,), a, b in zip(requests, want, got, strict=True):
        assert not isinstance(a, Exception) and not isinstance(b, Exception), (a, b)
        assert b.shape == a.shape, (tuple(b.shape), tuple(a.shape))
        rows = item.num_tokens - (int(item.segment_lens.sum()) if item.has_sound else 0)
        errors.append(float((b[:rows].float().cpu() - a[:rows].float().cpu()).abs().max() / a[:rows].abs().max()))
    return errors


class RecordingEncoder:
    """A multimodal encoder that keeps the pixel values each vision forward received."""

    def __init__(self, encoder):
        self.encoder, self.pixels = encoder, []

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode_images(self, pixel_values, grid_thw):
        self.pixels.append(pixel_values)
        return self.encoder.encode_images(pixel_values, grid_thw)

    def encode_videos(self, pixel_values_videos, video_grid_thw):
        self.pixels.append(pixel_values_videos)
        return self.encoder.encode_videos(pixel_values_videos, video_grid_thw)


@pytest.fixture(scope="module")
def tiny_processor(tiny_checkpoint):
    return MiMoProcessor.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module", params=["tiny", "v2.5"])
def processor(request, tiny_processor):
    """The tiny checkpoint's processor (1920x1080 downscaled), and V2.5's image budget (1920x1080 kept, 1920x1088)."""
    if request.param == "tiny":
        return tiny_processor
    config = dataclasses.replace(tiny_processor.config, image_max_pixels=4096 * 32 * 32)
    return MiMoProcessor(tiny_processor.tokenizer, config, model_type=tiny_processor.model_type,
                         vocab_size=tiny_processor.vocab_size)  # fmt: skip


@pytest.fixture(scope="module")
def towers(tiny_checkpoint):
    return load_multimodal_encoder(tiny_checkpoint, torch.float32, torch.device("cpu"))


def shipped(processor, kind: str, data: bytes, **options) -> dict[str, np.ndarray]:
    inputs = {"text_input": np.array([[b"What is it?"]], dtype=np.object_), kind: np.array([[data]], dtype=np.object_)}
    outputs = preprocess_request(processor, inputs, MAX_MODEL_LEN, **options)
    return {name: outputs[name] for name in PACKED_MEDIA_TENSORS}


def encoder_pixels(towers, processor, packed) -> torch.Tensor:
    recording = RecordingEncoder(towers)
    table = PromptTableEncoder(recording, processor.config).encode([unpack_request(packed)])[0]
    assert not isinstance(table, Exception), table
    (pixels,) = recording.pixels
    return pixels


@pytest.mark.parametrize("jpeg_to_encoder", [False, True])
@pytest.mark.parametrize("name", list(IMAGES))
def test_image_patches_equal_todays_bit_for_bit(towers, processor, name, jpeg_to_encoder):
    packed = shipped(processor, "image_bytes_input", IMAGES[name], jpeg_to_encoder=jpeg_to_encoder)
    travels_as_jpeg = jpeg_to_encoder and name in TRAVEL_AS_JPEG
    assert (packed["jpeg_rows"][0, 0] > 0) == travels_as_jpeg and (packed["frames_rows"][0, 0] > 0) != travels_as_jpeg
    want = todays_image_patches(IMAGES[name], processor.config)
    assert torch.equal(encoder_pixels(towers, processor, packed), want)


@pytest.mark.parametrize("name", list(VIDEOS))
def test_video_patches_equal_todays_bit_for_bit(towers, processor, name):
    packed = shipped(processor, "video_bytes_input", VIDEOS[name])
    want = todays_video_patches(VIDEOS[name], processor.config)
    assert torch.equal(encoder_pixels(towers, processor, packed), want)


def test_a_1080p_image_ships_its_uint8_frame_not_float_patches(tiny_processor):
    config = dataclasses.replace(tiny_processor.config, image_max_pixels=4096 * 32 * 32)  # V2.5's
    processor = MiMoProcessor(tiny_processor.tokenizer, config, model_type=tiny_processor.model_type,
                              vocab_size=tiny_processor.vocab_size)  # fmt: skip
    packed = shipped(processor, "image_bytes_input", IMAGES["jpeg_1920x1080"])
    assert packed["frames"].dtype == np.uint8 and packed["frames"].size == 1080 * 1920 * 3
    assert packed["frame_shape"].tolist() == [[[1, 1080, 1920]]] and packed["grid_thw"].tolist() == [[[1, 68, 120]]]
    total = sum(array.nbytes for array in packed.values())
    assert 1080 * 1920 * 3 <= total < 1080 * 1920 * 3 + 1024  # 5.93 MiB; the float32 patches were 47.81 MiB
    as_jpeg = shipped(processor, "image_bytes_input", IMAGES["jpeg_1920x1080"], jpeg_to_encoder=True)
    assert sum(array.nbytes for array in as_jpeg.values()) < len(IMAGES["jpeg_1920x1080"]) + 1024


def test_jpeg_on_encoder_admits_only_what_nvjpeg_shows_as_pil_does(tiny_processor):
    config = tiny_processor.config
    assert jpeg_on_encoder(IMAGES["jpeg_1001x517"], config) == (517, 1001)
    gray = jpeg(photo(40, 30)[..., 0])
    assert jpeg_on_encoder(gray, config) == (30, 40)
    assert jpeg_on_encoder(IMAGES["jpeg_exif_rotated"], config) is None  # PIL applies the orientation
    assert jpeg_on_encoder(jpeg(photo(40, 30), progressive=True), config) is None
    assert jpeg_on_encoder(IMAGES["png_64x32"], config) is None
    cmyk = io.BytesIO()
    Image.fromarray(photo(40, 30)).convert("CMYK").save(cmyk, format="JPEG")
    assert jpeg_on_encoder(cmyk.getvalue(), config) is None


def test_frames_that_do_not_make_the_grid_are_refused(towers, tiny_processor):
    config = tiny_processor.config
    packed = shipped(tiny_processor, "image_bytes_input", IMAGES["png_64x32"])
    (item,) = unpack_request(packed)
    frames = frames_of(item.frames, item.frame_shape)
    with pytest.raises(ProcessingError, match=r"frames hold 6144 values, frame_shape \[1, 32, 32\] needs"):
        frames_of(item.frames, torch.tensor([[1, 32, 32]]))
    with pytest.raises(ProcessingError, match=r"3 frames cannot make grid_thw \[1, 4, 6\]"):
        vision_patches(frames.expand(3, -1, -1, -1), item.grid_thw, config)
    with pytest.raises(ProcessingError, match="frames must be uint8"):
        vision_patches(frames.float(), item.grid_thw, config)
    item.grid_thw = torch.tensor([[1, 4, 4]])
    result = PromptTableEncoder(towers, config).encode([[item]])[0]
    assert isinstance(result, ProcessingError)
    assert "1 frame(s) of 64x32 give grid_thw [1, 4, 6], the item has [1, 4, 4]" in str(result)


def test_jpeg_decode_setting(tiny_checkpoint, tmp_path):
    def rendered(**settings):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        render_repository(RepositorySettings(checkpoint=tiny_checkpoint, **settings), root)
        return (root / "preprocessing" / "config.pbtxt").read_text()

    assert 'key: "jpeg_to_encoder" value { string_value: "no" }' in rendered()  # cpu: PIL in preprocessing
    with pytest.raises(ValueError, match="--jpeg-decode encoder decodes with nvJPEG on the encoder's GPU"):
        RepositorySettings(checkpoint=tiny_checkpoint, jpeg_decode="encoder")
    with pytest.raises(ValueError, match="jpeg_decode must be auto, encoder or preprocessing"):
        RepositorySettings(checkpoint=tiny_checkpoint, jpeg_decode="gpu")
    gpu = RepositorySettings(checkpoint=tiny_checkpoint, device="gpu")
    from mimo.processing.image import nvjpeg_available

    assert gpu.jpeg_to_encoder == nvjpeg_available()
    assert dataclasses.replace(gpu, jpeg_decode="encoder").jpeg_to_encoder
    assert not dataclasses.replace(gpu, jpeg_decode="preprocessing").jpeg_to_encoder


def test_media_preprocessing_runs_the_preprocessing_instances(tiny_checkpoint, tmp_path):
    """The encoder role's media step decodes the items of concurrent requests in parallel: as many unbatched CPU
    instances (processes) as preprocessing (`--preprocessing-instances`), with the same JPEG setting."""
    settings = RepositorySettings(checkpoint=tiny_checkpoint, role="encoder", preprocessing_instances=3)
    render_repository(settings, tmp_path / "encoder")
    media = (tmp_path / "encoder" / "media_preprocessing" / "config.pbtxt").read_text()
    assert "instance_group [ { count: 3 kind: KIND_CPU } ]" in media and "dynamic_batching" not in media
    assert 'key: "jpeg_to_encoder" value { string_value: "no" }' in media


def test_a_bf16_table_comparison_leaves_out_the_sound_rows(tiny_checkpoint, tiny_processor):
    """What tests/test_preprocess_gpu.py meets (bf16 towers on a GPU against float32 ones), on the CPU: bf16 towers
    on FlexAttention (the GPU's attention path, eager here), their audio tokenizer's features given noise of 2**-8
    of their largest value (one bf16 step there; other bf16 kernels move them more: the CPU's bf16 features differ
    from float32 ones by 1.4% of it). Sound codes flip on near-ties and move the video's sound rows by far more
    than a bf16 tolerance (0.41 of the table on an H200), while the vision rows stay within one."""
    config, cpu = tiny_processor.config, torch.device("cpu")
    requests = [unpack_request(shipped(tiny_processor, kind, data)) for kind, data in
                [("image_bytes_input", IMAGES["jpeg_1001x517"]), ("video_bytes_input", VIDEOS["silent_96x64"]),
                 ("video_bytes_input", VIDEOS["sound_640x360"])]]  # fmt: skip
    want = PromptTableEncoder(load_multimodal_encoder(tiny_checkpoint, torch.float32, cpu), config).encode(requests)
    towers = load_multimodal_encoder(tiny_checkpoint, torch.bfloat16, cpu)
    towers.visual.attention_impl = towers.audio_tokenizer.encoder.attention_impl = "flex"
    tokenizer = towers.audio_tokenizer.encoder
    features = tokenizer.features

    def nudged(mels, mel_lens):
        f = features(mels, mel_lens).float()
        return f + f.abs().max() * 2**-8 * torch.randn(f.shape, generator=torch.Generator().manual_seed(0))

    (video,) = requests[-1]
    mel, mel_lens = video.mel.bfloat16()[None], torch.tensor([video.mel.shape[0]])
    with torch.no_grad():
        assert not torch.equal(tokenizer.quantizer.vq.encode(nudged(mel, mel_lens)),
                               tokenizer.quantizer.vq.encode(features(mel, mel_lens)))  # fmt: skip
    tokenizer.features = nudged
    got = PromptTableEncoder(towers, config).encode(requests)
    assert max(vision_table_errors(requests, want, got)) < 0.05
    sound = towers.encode_video_audio(mel[0], video.segment_starts, video.segment_lens)
    assert torch.equal(got[-1][-sound.shape[0]:], sound)  # the towers' own sound rows, after the vision rows
    moved = (got[-1][-sound.shape[0]:].float() - want[-1][-sound.shape[0]:]).abs().max() / want[-1].abs().max()
    assert moved > 0.05, float(moved)
