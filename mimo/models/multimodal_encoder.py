"""The encoder side of MiMo-V2.5: vision tower, audio tokenizer and audio tower behind one object.

Used by the Triton `mimo_encoder` model. Every method encodes all items of a call with one forward per tower
and returns one `[tokens_i, out_hidden]` tensor per item, on the towers' device, in item order; those rows
fill the item's placeholder tokens (ref §7.2, §8).
"""

from __future__ import annotations

import torch
from torch import nn

from mimo.models.audio_tokenizer import MiMoAudioTokenizer
from mimo.models.audio_tower import MiMoAudioEncoder
from mimo.models.vision_tower import MiMoVisionTransformer


class MiMoMultimodalEncoder(nn.Module):
    def __init__(self, visual: MiMoVisionTransformer, audio_encoder: MiMoAudioEncoder, audio_tokenizer: MiMoAudioTokenizer):
        super().__init__()
        vision_width, audio_width = visual.config.out_hidden_size, audio_encoder.config.out_hidden_size
        if vision_width != audio_width:
            raise ValueError(
                f"vision out_hidden_size={vision_width} and audio out_hidden_size={audio_width} must both be the "
                "LM hidden size"
            )
        audio_config, tokenizer_config = audio_encoder.config, audio_tokenizer.config
        if tokenizer_config.num_quantizers < audio_config.audio_channels:
            raise ValueError(
                f"the audio tokenizer emits {tokenizer_config.num_quantizers} code channels but the audio tower "
                f"reads audio_channels={audio_config.audio_channels}"
            )
        for channel, (codebook, vocab) in enumerate(zip(tokenizer_config.codebook_size, audio_config.speech_vocab_sizes)):
            if codebook > vocab:
                raise ValueError(
                    f"code channel {channel}: tokenizer codebook_size {codebook} exceeds speech_vocab_size {vocab}"
                )
        # attribute names = checkpoint role prefixes (`visual.`, `audio_encoder.`, the `audio_tokenizer/` folder)
        self.visual = visual
        self.audio_encoder = audio_encoder
        self.audio_tokenizer = audio_tokenizer

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values [N, C*T*p*p], grid_thw [n, 3] -> one [t*h*w / 4, hidden] per image."""
        return self._encode_visual(pixel_values, grid_thw)

    @torch.no_grad()
    def encode_videos(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Same tower as images; one [t*h*w / 4, hidden] per video covering all its `<|video_pad|>` tokens."""
        return self._encode_visual(pixel_values_videos, video_grid_thw)

    @torch.no_grad()
    def encode_audios(self, mels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Log-mel spectrograms, each [T_mel, n_mels] -> one [audio_token_count(T_mel), hidden] per audio."""
        if not mels:
            return []
        codes = self.audio_tokenizer.encode_batch(mels, segment_size=self.audio_encoder.config.audio_segment_size)
        return self.audio_encoder.encode_batch(codes)

    @torch.no_grad()
    def encode_video_audio(
        self, mel: torch.Tensor, segment_starts: torch.Tensor, segment_lens: torch.Tensor
    ) -> torch.Tensor:
        """A video's sound track, embedded and trimmed to its units (sglang `encode_video_audio`).

        Args:
            mel: [T_mel, n_mels] log-mel of the whole sound track.
            segment_starts, segment_lens: [units] int, the audio rows of each video unit.
        Returns:
            [sum(segment_lens), hidden]: rows [start, start + len) of each unit, in unit order.
        """
        rows = self.encode_audios([mel])[0]  # [audio tokens, hidden]
        if (
            segment_starts.dim() != 1 or segment_starts.shape != segment_lens.shape or segment_starts.numel() == 0
            or segment_starts.is_floating_point() or segment_lens.is_floating_point()
        ):
            raise ValueError(
                "segment_starts and segment_lens must be non-empty 1-D integer tensors of one length, found "
                f"{segment_starts.dtype} {tuple(segment_starts.shape)} and {segment_lens.dtype} {tuple(segment_lens.shape)}"
            )
        starts, lens = segment_starts.to(rows.device, torch.long), segment_lens.to(rows.device, torch.long)
        if (lens < 1).any() or (starts < 0).any() or (starts + lens > rows.shape[0]).any():
            raise ValueError(
                f"video audio units (starts {segment_starts.tolist()}, lens {segment_lens.tolist()}) must be "
                f"non-empty and lie within the sound track's {rows.shape[0]} audio tokens"
            )
        unit_offsets = lens.cumsum(0) - lens  # where each unit starts in the output
        within = torch.arange(int(lens.sum()), device=rows.device) - unit_offsets.repeat_interleave(lens)
        return rows[starts.repeat_interleave(lens) + within]

    @torch.no_grad()
    def warm_up(self) -> None:
        """Encodes synthetic images and audio of two shapes each, so that the compiled CUDA paths (vision blocks,
        FlexAttention kernels, the audio tokenizer stack) compile at load rather than on the first requests: the
        second shape makes the compiler treat the sizes as dynamic, so later shapes reuse the compiled code.

        The image shapes are real ones (one 1920x1080 image, then eight 1024x1024 in one forward): with tiny first
        shapes (64 then 240 patches) inductor's dynamic FlexAttention lowering found no valid kernel configuration
        at MiMo-V2.5 widths on an H200 (NoValidChoicesError), while these compile and serve every later size."""
        weight = next(self.visual.parameters())  # inputs as `PromptTableEncoder` passes them: on the device, cast
        vision = self.visual.config
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        for grids in ([[1, 68, 120]], [[1, 64, 64]] * 8):  # patches of 1920x1080 and 1024x1024 at patch 16
            grid = torch.tensor(grids)  # grids stay on the host
            pixels = torch.randn(int(grid.prod(dim=-1).sum()), patch_dim).to(weight.device, weight.dtype)
            self.encode_images(pixels, grid)
        for frames in (400, 1000):
            mel = torch.randn(frames, self.audio_tokenizer.config.n_mels).to(weight.device, weight.dtype)
            self.encode_audios([mel])

    def _encode_visual(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        if grid_thw.dim() == 2 and grid_thw.shape[0] == 0 and pixel_values.shape[0] == 0:
            return []
        embeddings = self.visual(pixel_values, grid_thw)  # [N / 4, hidden]; validates both inputs
        return list(embeddings.split((grid_thw.prod(dim=-1) // self.visual.config.merge_unit).tolist()))
