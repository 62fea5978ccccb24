"""Chat messages -> template-rendered prompt text plus the media parts in prompt order.

Messages are HF-style: `{"role": ..., "content": str | [part, ...]}` with parts
`{"type": "text", "text": str}` or `{"type": "image" | "audio" | "video", <type>: bytes}`; other keys of a
message (reasoning_content, tool_calls, ...) pass through to the chat template.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mimo.processing.errors import MediaLimitError, ProcessingError
from mimo.processing.items import Modality

_MEDIA_TYPES = {"image": Modality.IMAGE, "audio": Modality.AUDIO, "video": Modality.VIDEO}


@dataclass(frozen=True, slots=True)
class MediaPart:
    modality: Modality
    data: bytes


def control_token_pattern(tokens: Iterable[str]) -> re.Pattern:
    """Matches any of the tokenizer's added tokens (ChatML roles, media placeholders, reasoning and tool markup)."""
    return re.compile("|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True)))


def check_plain_text(text: str, where: str, control_tokens: re.Pattern | None) -> None:
    """Message text is tokenised as part of the rendered prompt, so a control token typed into it would become a
    real one (a forged role turn, a media placeholder without media): such text is refused."""
    found = control_tokens.search(text) if control_tokens is not None else None
    if found:
        raise ProcessingError(f"{where} contains {found.group()!r}, a control token of the chat format; control "
                              f"tokens are not accepted in message text")


def split_media(messages: list[dict], *, max_media_items: int,
                control_tokens: re.Pattern | None = None) -> tuple[list[dict], list[MediaPart]]:  # fmt: skip
    """Validate `messages`; return them with media bytes stripped (the template needs only the part type)
    and the media parts in the order the template renders them. Text containing a match of `control_tokens`
    is refused (see `check_plain_text`)."""
    if not isinstance(messages, list) or not messages:
        raise ProcessingError("messages must be a non-empty list")
    rendered, media = [], []
    for m_index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ProcessingError(f"messages[{m_index}] must be a dict with a string 'role'")
        content = message.get("content")
        if content is None or isinstance(content, str):
            check_plain_text(content or "", f"messages[{m_index}].content", control_tokens)
            rendered.append(message)
            continue
        if not isinstance(content, list):
            raise ProcessingError(f"messages[{m_index}].content must be a string or a list of parts")
        parts = []
        for p_index, part in enumerate(content):
            where = f"messages[{m_index}].content[{p_index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ProcessingError(f"{where}: text part needs a string 'text'")
                check_plain_text(part["text"], f"{where}.text", control_tokens)
                parts.append({"type": "text", "text": part["text"]})
            elif kind in _MEDIA_TYPES:
                data = part.get(kind)
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise ProcessingError(f"{where}: {kind} part needs the encoded file as bytes under '{kind}'")
                media.append(MediaPart(_MEDIA_TYPES[kind], bytes(data)))
                parts.append({"type": kind})
            else:
                raise ProcessingError(f"{where}: unsupported content part type {kind!r} (text, image, audio, video)")
        rendered.append({**message, "content": parts})
    if len(media) > max_media_items:
        raise MediaLimitError(f"request has {len(media)} media items, the limit is {max_media_items}")
    return rendered, media


def render_chat(tokenizer, messages: list[dict], *, enable_thinking: bool, add_generation_prompt: bool,
                tools: list[dict] | None = None) -> str:
    """The tokenizer's chat template applied to already-validated messages (text, not ids)."""
    if tokenizer.chat_template is None:
        raise ProcessingError("the tokenizer has no chat template (tokenizer_config.json: chat_template)")
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
    )
