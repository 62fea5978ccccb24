"""The tiny tokenizer files: byte-level BPE round trip, special tokens, and MiMo's chat template."""

import json

import pytest
from transformers import PreTrainedTokenizerFast

from mimo.processing.tokenizer_files import DEFAULT_SYSTEM_PROMPT, MULTIMODAL_TOKENS, write_tiny_tokenizer


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    info = write_tiny_tokenizer(directory)
    return directory, info, PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def test_writes_the_three_files_and_returns_every_id(written):
    directory, info, tokenizer = written
    assert {p.name for p in directory.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert info["vocab_size"] == len(tokenizer)
    assert info["eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert info["pad_token_id"] == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for key, token in MULTIMODAL_TOKENS.items():
        assert info[key] == tokenizer.convert_tokens_to_ids(token)
    special_map = json.loads((directory / "special_tokens_map.json").read_text())
    assert special_map["eos_token"] == "<|im_end|>"
    assert len(set(info.values()) - {info["vocab_size"]}) == len(info) - 1  # all ids distinct


def test_is_deterministic(tmp_path, written):
    _, info, _ = written
    assert write_tiny_tokenizer(tmp_path) == info
    assert (tmp_path / "tokenizer.json").read_text() == (written[0] / "tokenizer.json").read_text()


@pytest.mark.parametrize("text", [
    "The quick brown fox.", "  leading spaces\tand\nnewlines\n", "中文, русский, العربية, emoji 🎉👍🏽",
    "\x00\x01 control \u200b zero-width", "00:00 01:30 100:00",
])
def test_any_utf8_round_trips(written, text):
    _, _, tokenizer = written
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_merges_were_learned(written):
    _, _, tokenizer = written
    assert len(tokenizer.encode("the answer to the question", add_special_tokens=False)) < 20


def test_added_tokens_are_single_ids(written):
    _, _, tokenizer = written
    markup = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
              "<tool_response>", "</tool_response>", *MULTIMODAL_TOKENS.values()]
    for token in markup:
        assert len(tokenizer.encode(f"a{token}b", add_special_tokens=False)) == 3, token
    # reasoning and tool markup survive skip_special_tokens; control tokens do not
    ids = tokenizer.encode("<|im_start|><think>x</think><|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think>"


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_chat_template_default_system_and_generation_prompt(written):
    _, _, tokenizer = written
    messages = [{"role": "user", "content": "Hi"}]
    assert render(tokenizer, messages, add_generation_prompt=True) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    )
    assert render(tokenizer, messages, add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think></think>")
    custom = [{"role": "system", "content": "Be brief."}, *messages]
    assert render(tokenizer, custom).startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi")


def test_chat_template_media_parts_become_placeholders(written):
    _, _, tokenizer = written
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image"}, {"type": "audio"}, {"type": "video"}, {"type": "text", "text": "b"}]}]
    assert "user\na<|vision_start|><|image_pad|><|vision_end|><|mimo_audio_start|><|audio_pad|><|mimo_audio_end|>" \
           "<|vision_start|><|video_pad|><|vision_end|>b<|im_end|>" in render(tokenizer, messages)


def test_chat_template_reasoning_and_tools(written):
    _, _, tokenizer = written
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "need a tool",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Paris", "days": 2}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny.", "reasoning_content": "easy"},
        {"role": "user", "content": "Thanks"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = render(tokenizer, messages, tools=tools, add_generation_prompt=True)
    assert '<tools>\n{"name": "get_weather", "parameters": {"type": "object"}}\n</tools>' in text
    # older assistant turns (before the last user turn) lose their reasoning
    assert "<|im_start|>assistant\n<think></think>\n<tool_call>\n<function=get_weather>\n" \
           "<parameter=city>Paris</parameter>\n<parameter=days>2</parameter>\n</function>\n</tool_call><|im_end|>" in text
    assert "<|im_start|>tool\n<tool_response>sunny</tool_response><|im_end|>" in text
    assert "<|im_start|>assistant\n<think></think>Sunny.<|im_end|>" in text
    last_turn = render(tokenizer, messages[:4])
    assert last_turn.endswith("<|im_start|>assistant\n<think>easy</think>Sunny.<|im_end|>")
    assert "<think>need a tool</think>" in render(tokenizer, messages, keep_all_reasoning=True)
