"""A tiny but real MiMo-style tokenizer (byte-level BPE + MiMo's ChatML template and special tokens).

Used by the tiny-checkpoint builder and the tests; the processor treats it exactly like a downloaded
MiMo-V2.5 tokenizer (every id it needs comes from `processor_config`, never from this module).
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Special tokens of ref §7.1, keyed by their processor_config id key.
MULTIMODAL_TOKENS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "audio_token_id": "<|audio_pad|>",
    "video_start_token_id": "<|mimo_video_start|>",
    "video_end_token_id": "<|mimo_video_end|>",
    "audio_start_token_id": "<|mimo_audio_start|>",
    "audio_end_token_id": "<|mimo_audio_end|>",
}
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
_CONTROL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN, *MULTIMODAL_TOKENS.values()]
# Reasoning and tool markup stay visible when decoding, so they are added but not "special".
_MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

DEFAULT_SYSTEM_PROMPT = "You are MiMo, a helpful AI assistant engineered by Xiaomi."

# MiMo's ChatML (ref §7.1): no newline after <|im_end|>; media parts become one placeholder each, which the
# processor expands; the last assistant turn keeps its reasoning, older ones get an empty <think></think>.
CHAT_TEMPLATE = (
    "{% macro render_content(content) %}"
    "{% if content is string %}{{ content }}"
    "{% elif content is not none %}"
    "{% for part in content %}"
    "{% if part.type == 'text' %}{{ part.text }}"
    "{% elif part.type in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part.type in ('audio', 'audio_url', 'input_audio') %}<|mimo_audio_start|><|audio_pad|><|mimo_audio_end|>"
    "{% elif part.type in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ raise_exception('unsupported content part type: ' ~ part.type) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endmacro %}"
    "{% set ns = namespace(last_user=-1) %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}"
    "{% endfor %}"
    "<|im_start|>system\n"
    "{% if messages and messages[0].role == 'system' %}{{ render_content(messages[0].content) }}"
    "{% else %}" + DEFAULT_SYSTEM_PROMPT + "{% endif %}"
    "{% if tools %}"
    "{{ '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' }}{{ (tool.function if tool.function is defined else tool) | tojson }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nTo call a function, reply with:\\n<tool_call>\\n<function=NAME>\\n"
    "<parameter=KEY>VALUE</parameter>\\n</function>\\n</tool_call>' }}"
    "{% endif %}"
    "<|im_end|>"
    "{% for message in messages %}"
    "{% if message.role == 'system' and loop.first %}"
    "{% elif message.role == 'assistant' %}"
    "<|im_start|>assistant\n"
    "{% if keep_all_reasoning or loop.index0 > ns.last_user %}"
    "<think>{{ message.reasoning_content or '' }}</think>"
    "{% else %}<think></think>{% endif %}"
    "{{ render_content(message.content) }}"
    "{% for call in message.tool_calls or [] %}"
    "{% set fn = call.function if call.function is defined else call %}"
    "{{ '\\n<tool_call>\\n<function=' ~ fn.name ~ '>\\n' }}"
    "{% if fn.arguments is string %}{{ fn.arguments ~ '\\n' }}"
    "{% else %}{% for key, value in (fn.arguments or {}).items() %}"
    "<parameter={{ key }}>{{ value if value is string else value | tojson }}</parameter>{{ '\\n' }}"
    "{% endfor %}{% endif %}"
    "</function>{{ '\\n' }}</tool_call>"
    "{% endfor %}"
    "<|im_end|>"
    "{% elif message.role == 'tool' %}"
    "<|im_start|>tool\n<tool_response>{{ render_content(message.content) }}</tool_response><|im_end|>"
    "{% else %}"
    "<|im_start|>{{ message.role }}\n{{ render_content(message.content) }}<|im_end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}"
)

# Training text for the merges; any UTF-8 still round-trips through the 256-symbol byte alphabet.
_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A picture shows a cat sitting on a red chair near the window.
Describe the image in detail. What is happening in this video? Listen to the audio and answer the question.
The assistant thinks step by step before giving the final answer to the user.
Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100 and 1000 appear in times such as 00:00, 00:02 and 01:30.
Please call the weather function with the city and the unit; the tool returns the temperature in celsius.
Machine learning models read text, images, sound and video; they answer questions about the world.
In the morning the sun rises in the east, and in the evening it sets in the west over the sea.
"""
_NUM_MERGES = 300


def _train_byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + _NUM_MERGES, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer=trainer)
    tokenizer.add_special_tokens(_CONTROL_TOKENS)
    tokenizer.add_tokens(_MARKUP_TOKENS)
    return tokenizer


def write_tiny_tokenizer(out_dir: str | Path) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`.

    Returns `vocab_size` (all tokens, added ones included), `eos_token_id`, `pad_token_id` and every
    `processor_config` token-id key of ref §7.1.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_byte_level_bpe()
    tokenizer.save(str(out_dir / "tokenizer.json"))

    special = set(_CONTROL_TOKENS)
    added_tokens_decoder = {
        str(tokenizer.token_to_id(token)): {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": token in special,
        }
        for token in _CONTROL_TOKENS + _MARKUP_TOKENS
    }
    additional = [token for token in _CONTROL_TOKENS if token not in (EOS_TOKEN, PAD_TOKEN)]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": additional,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    special_tokens_map = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "additional_special_tokens": additional}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2))

    ids = {key: tokenizer.token_to_id(token) for key, token in MULTIMODAL_TOKENS.items()}
    return {
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "eos_token_id": tokenizer.token_to_id(EOS_TOKEN),
        "pad_token_id": tokenizer.token_to_id(PAD_TOKEN),
        **ids,
    }
