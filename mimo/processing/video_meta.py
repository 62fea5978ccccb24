"""Video metadata that travels from the encoder to the LM side with the embeddings (ref §8).

Which fields travel depends on the model type (sglang's `video_meta_attrs_for`): every model gets the
timestamps, MiMo models also the video-audio fields. `video_audio_embedding` (the sound-track rows trimmed
to the units) is produced by the encoder and is not part of what the processor can supply.
"""

import torch

from mimo.processing.items import MediaItem, Modality

_BASE_ATTRS = ("video_timestamps", "second_per_grid_ts")
_MIMO_ATTRS = (
    "video_audio_feature_lens", "video_audio_segment_lens_flat", "video_audio_per_video_num_units",
    "video_audio_embedding",
)


def video_meta_attrs_for(model_type: str) -> tuple[str, ...]:
    if "mimo" in model_type.lower():
        return _BASE_ATTRS + _MIMO_ATTRS
    return _BASE_ATTRS


def video_meta(items: list[MediaItem], model_type: str) -> dict[str, torch.Tensor]:
    """The processor-side fields of `video_meta_attrs_for(model_type)` over the video items, in prompt order:

    video_timestamps [Σ grid_t] float64, second_per_grid_ts [videos] float64,
    video_audio_feature_lens [videos with sound] int64 (audio tokens of each whole sound track),
    video_audio_segment_lens_flat [Σ units] int64, video_audio_per_video_num_units [videos] int64 (0 = silent).
    """
    videos = [item for item in items if item.modality == Modality.VIDEO]
    with_sound = [item for item in videos if item.has_sound]
    empty_long, empty_float = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    fields = {
        "video_timestamps": torch.cat([v.video_timestamps for v in videos] or [empty_float]),
        "second_per_grid_ts": torch.cat([v.second_per_grid_ts for v in videos] or [empty_float]),
        "video_audio_feature_lens": torch.cat([v.audio_token_len for v in with_sound] or [empty_long]),
        "video_audio_segment_lens_flat": torch.cat([v.segment_lens for v in with_sound] or [empty_long]),
        "video_audio_per_video_num_units": torch.tensor(
            [v.segment_lens.numel() if v.has_sound else 0 for v in videos], dtype=torch.long
        ),
    }
    return {name: fields[name] for name in video_meta_attrs_for(model_type) if name in fields}
