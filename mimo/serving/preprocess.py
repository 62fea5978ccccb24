"""`preprocessing` without Triton: user text + encoded media -> prompt-table input_ids and packed encoder inputs.

Media arrive as the encoded files (PNG/JPEG/..., WAV/..., MP4/...). JSON transports (HTTP `generate_stream`)
cannot carry raw bytes, so an item may instead be a `data:<mime>;base64,<payload>` URL; no supported file
format starts with `data:`, so the two forms cannot be confused.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence

import numpy as np

from mimo.epd.plan import RequestPlan, plan_request
from mimo.processing.chat import check_plain_text
from mimo.processing.errors import ProcessingError
from mimo.processing.items import pack_items
from mimo.processing.processor import ContextBudget, MiMoProcessor

MEDIA_INPUTS = {"image_bytes_input": "image", "audio_bytes_input": "audio", "video_bytes_input": "video"}

def decode_media_item(data: bytes, input_name: str, index: int) -> bytes:
    """The encoded file itself, or the payload of a base64 `data:` URL."""
    if not data:
        raise ProcessingError(f"{input_name}[{index}] is empty")
    if not data.startswith(b"data:"):
        return data
    header, sep, payload = data.partition(b",")
    if not sep or not header.endswith(b";base64"):
        raise ProcessingError(f"{input_name}[{index}] is a data URL but not 'data:<mime>;base64,<payload>'")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise ProcessingError(f"{input_name}[{index}] has an invalid base64 payload ({error})") from None


def user_messages(text: bytes, media: Mapping[str, Sequence[bytes]],
                  control_tokens: re.Pattern | None = None) -> list[dict]:  # fmt: skip
    """One user turn: the media parts (images, then audio, then video) followed by the text, which must not contain
    a match of `control_tokens` (the processor's: see `mimo.processing.chat.check_plain_text`)."""
    try:
        prompt = text.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProcessingError(f"text_input is not valid UTF-8 ({error.reason} at byte {error.start})") from None
    if not prompt.strip():
        raise ProcessingError("text_input is empty")
    check_plain_text(prompt, "text_input", control_tokens)
    content = []
    for input_name, kind in MEDIA_INPUTS.items():
        for index, data in enumerate(media.get(input_name, ())):
            content.append({"type": kind, kind: decode_media_item(data, input_name, index)})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def stop_words_list(processor: MiMoProcessor, words: Sequence[bytes]) -> np.ndarray:
    """TensorRT-LLM's `[1, 2, L]` stop-word format: concatenated ids, then each word's end offset (-1 padded)."""
    ids, offsets = [], []
    for index, word in enumerate(words):
        try:
            tokens = processor.encode_text(word.decode("utf-8"))
        except UnicodeDecodeError:
            raise ProcessingError(f"stop_words[{index}] is not valid UTF-8") from None
        if not tokens:
            raise ProcessingError(f"stop_words[{index}] is empty")
        ids += tokens
        offsets.append(len(ids))
    width = max(1, len(ids))
    return np.array([[ids + [0] * (width - len(ids)), offsets + [-1] * (width - len(offsets))]], dtype=np.int32)


def preprocess_request(processor: MiMoProcessor, inputs: Mapping[str, np.ndarray], max_model_len: int, *,
                       jpeg_to_encoder: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """Every `preprocessing` output of one request (each with its batch dimension of 1) from its inputs; images and
    videos as their decoded uint8 frames, or with `jpeg_to_encoder` a JPEG as its file (`preprocess_media`).

    A prompt (media tokens included) that leaves no room for `max_tokens` (0 if not given) within `max_model_len`
    is refused here, before any encoder work, with the engine's message; as early as that is known, before any media
    decoding where the media's headers and containers tell (`MiMoProcessor.process`).
    """
    messages, budget = _messages_and_budget(processor, inputs, max_model_len)
    prompt = processor.process(messages, budget=budget, jpeg_to_encoder=jpeg_to_encoder)
    outputs = _llm_outputs(processor, processor.assign_prompt_table_ids(prompt).input_ids, inputs)
    outputs.update({name: array[np.newaxis] for name, array in pack_items(prompt.items).items()})
    return outputs


def plan_preprocessing(processor: MiMoProcessor, inputs: Mapping[str, np.ndarray],
                       max_model_len: int) -> tuple[dict[str, np.ndarray], RequestPlan]:  # fmt: skip
    """The language role's `preprocess_request`: the same mimo_llm inputs (input_ids with prompt-table ids, ...)
    without decoding any media, and the plan of the items the encoder servers are to encode (`mimo.epd.plan`);
    refused where preprocess_request refuses."""
    messages, budget = _messages_and_budget(processor, inputs, max_model_len)
    plan = plan_request(processor, messages, budget)
    return _llm_outputs(processor, plan.input_ids, inputs), plan


def _messages_and_budget(processor: MiMoProcessor, inputs: Mapping[str, np.ndarray],
                         max_model_len: int) -> tuple[list[dict], ContextBudget]:  # fmt: skip
    text = inputs.get("text_input")
    if text is None or text.size != 1:
        raise ProcessingError(f"text_input must hold exactly one string, got {0 if text is None else text.size}")
    max_tokens = inputs.get("max_tokens", np.zeros(1, dtype=np.int32))
    if max_tokens.size != 1:
        raise ProcessingError(f"max_tokens must hold exactly one value, got {max_tokens.size}")
    budget = ContextBudget(max_model_len, int(max_tokens.reshape(-1)[0]))
    media = {name: list(inputs[name].reshape(-1)) for name in MEDIA_INPUTS if name in inputs}
    return user_messages(text.reshape(-1)[0], media, processor.control_tokens), budget


def _llm_outputs(processor: MiMoProcessor, input_ids: list[int],
                 inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:  # fmt: skip
    tokenizer = processor.tokenizer
    words = list(inputs["stop_words"].reshape(-1)) if "stop_words" in inputs else []
    return {
        "input_ids": np.array([input_ids], dtype=np.int32),
        "input_lengths": np.array([[len(input_ids)]], dtype=np.int32),
        "end_id": np.array([[tokenizer.eos_token_id]], dtype=np.int32),
        "pad_id": np.array([[tokenizer.pad_token_id]], dtype=np.int32),
        "stop_words_list": stop_words_list(processor, words),
    }
