"""ProcessorConfig: the hub `processor_config` (plus patch geometry) as one typed, validated object.

Defaults are sglang's (ref §5.3, §6) for keys a checkpoint leaves out; the special-token ids have no
default, because they differ between tokenizers and a wrong id silently corrupts every prompt.
"""

import dataclasses
import math
from dataclasses import dataclass

from mimo.processing.errors import ProcessingError

# processor_config keys of ref §7.1; each must be present.
TOKEN_ID_KEYS = (
    "vision_start_token_id",
    "vision_end_token_id",
    "image_token_id",
    "video_token_id",
    "audio_token_id",
    "video_start_token_id",
    "video_end_token_id",
    "audio_start_token_id",
    "audio_end_token_id",
)

_PIXEL_UNIT = 32 * 32  # one LM token of a 16x16-patch, 2x2-merge image


@dataclass(frozen=True, slots=True)
class SpecialTokenIds:
    vision_start: int
    vision_end: int
    image: int
    video: int
    audio: int
    video_start: int
    video_end: int
    audio_start: int
    audio_end: int


@dataclass(frozen=True, slots=True)
class ProcessorConfig:
    tokens: SpecialTokenIds
    # vision geometry (vision_config)
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    # images
    image_min_pixels: int = 4 * _PIXEL_UNIT
    image_max_pixels: int = 4096 * _PIXEL_UNIT
    image_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    image_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    # video
    video_min_pixels: int = 4 * _PIXEL_UNIT
    video_max_pixels: int = 4096 * _PIXEL_UNIT
    video_total_max_pixels: int = 16384 * _PIXEL_UNIT
    fps: float = 2.0
    num_frames: int | None = None
    min_frames: int = 8
    max_frames: int = 256
    video_audio_interleave_length: float = 0.0
    use_per_grid_t_timestamps: bool = False
    # audio (ref §6): 25 codes/s grouped by 4 -> 6.25 LM tokens/s
    audio_sampling_rate: int = 24000
    audio_n_mels: int = 128
    audio_nfft: int = 960
    audio_hop_length: int = 240
    audio_window_size: int = 960
    audio_input_id_per_second: float = 25.0
    audio_group_size: int = 4
    audio_segment_size: int = 6000  # mel frames the audio tokenizer encodes independently
    audio_stride_size: int = 2
    audio_avg_pooler: int = 2
    # request limits (ours, not the reference's)
    max_media_items: int = 16
    max_source_pixels: int = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS
    max_media_seconds: float = 3600.0

    @property
    def image_factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def audio_tokens_per_second(self) -> float:
        return self.audio_input_id_per_second / self.audio_group_size

    @classmethod
    def from_hf_config(cls, hf_config: dict, audio_tokenizer_config: dict | None = None) -> "ProcessorConfig":
        """Build from a hub config.json dict (and `audio_tokenizer/config.json` when the checkpoint has one).

        Token counts must equal the encoders' rows, so the geometry the encoders run with (vision_config
        patch sizes, audio_config group/segment sizes, the audio tokenizer's strides) is taken from their
        configs; a processor_config value contradicting them is an error.
        """
        processor = dict(hf_config.get("processor_config") or {})
        missing = [key for key in TOKEN_ID_KEYS if processor.get(key) is None]
        if missing:
            raise ProcessingError(f"processor_config.{missing[0]} must be set (missing: {', '.join(missing)})")
        tokens = SpecialTokenIds(*(int(processor.pop(key)) for key in TOKEN_ID_KEYS))
        if not processor.pop("use_video_timestamps", True):
            raise ProcessingError("processor_config.use_video_timestamps=false is not supported (MiMo-V2 needs them)")
        known = {field.name for field in dataclasses.fields(cls)} - {"tokens"}
        # A null value means "use the default", as in sglang's `processor_config.get(key) or default`.
        values = {key: value for key, value in processor.items() if key in known and value is not None}
        encoder_geometry = (
            (hf_config.get("vision_config"), (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                                              ("temporal_patch_size", "temporal_patch_size"))),
            (hf_config.get("audio_config"), (("audio_group_size", "group_size"),
                                             ("audio_segment_size", "audio_segment_size"))),
            (audio_tokenizer_config, (("audio_stride_size", "stride_size"), ("audio_avg_pooler", "avg_pooler"),
                                      ("audio_n_mels", "n_mels"), ("audio_sampling_rate", "sampling_rate"),
                                      ("audio_hop_length", "hop_length"))),
        )
        for source, pairs in encoder_geometry:
            for field, key in pairs:
                if not source or source.get(key) is None:
                    continue
                if field in values and values[field] != source[key]:
                    raise ProcessingError(
                        f"processor_config.{field}={values[field]} contradicts the encoder's {key}={source[key]}"
                    )
                values[field] = source[key]
        for key in ("image_mean", "image_std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        config = cls(tokens=tokens, **values)
        config._validate()
        return config

    def _validate(self) -> None:
        interleave = self.video_audio_interleave_length
        if not math.isfinite(interleave) or (interleave < 0 and interleave != -1):
            raise ProcessingError(
                f"processor_config.video_audio_interleave_length must be -1 or >= 0, got {interleave}"
            )
        if not 0 < self.image_min_pixels <= self.image_max_pixels:
            raise ProcessingError("processor_config: need 0 < image_min_pixels <= image_max_pixels")
        if not 0 < self.video_min_pixels <= self.video_max_pixels:
            raise ProcessingError("processor_config: need 0 < video_min_pixels <= video_max_pixels")
        if self.fps <= 0 or not 0 < self.min_frames <= self.max_frames:
            raise ProcessingError("processor_config: need fps > 0 and 0 < min_frames <= max_frames")
