import random

import pytest
from tokenizers import Tokenizer, models

from mimo.processing.tokenizer_files import write_tiny_tokenizer
from mimo.serving.detokenize import DETOKENIZATION_WINDOW, IncrementalDetokenizer, incomplete_tail_length

TEXT = "Hi 你好, 世界! 🙂🚀 café — naïve 𝄞 end"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(directory)
    return Tokenizer.from_file(str(directory / "tokenizer.json"))


def stream(detokenizer, ids, chunk_sizes):
    """What postprocessing emits for `ids` arriving in chunks, with the window mimo_llm attaches."""
    pieces, sent = [], 0
    for size in chunk_sizes:
        new = ids[sent : sent + size]
        preceding = ids[max(0, sent - DETOKENIZATION_WINDOW) : sent]
        sent += size
        pieces.append(detokenizer.text_piece(preceding, new, final=sent == len(ids)))
    return pieces


def test_multibyte_characters_span_several_tokens(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    partial = [detokenizer.token_bytes([i]) for i in ids if incomplete_tail_length(detokenizer.token_bytes([i]))]
    assert partial, "the test text must split characters across tokens"


def test_token_by_token_stream_reassembles_exactly_without_broken_characters(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    pieces = stream(IncrementalDetokenizer(tokenizer), ids, [1] * len(ids))
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces, "some responses must hold back the start of a character"


@pytest.mark.parametrize("seed", range(5))
def test_random_chunking_reassembles_exactly(tokenizer, seed):
    ids = tokenizer.encode(TEXT * 2).ids
    rng = random.Random(seed)
    sizes = []
    while sum(sizes) < len(ids):
        sizes.append(min(rng.randint(1, 4), len(ids) - sum(sizes)))
    pieces = stream(IncrementalDetokenizer(tokenizer), ids, sizes)
    assert "".join(pieces) == TEXT * 2
    assert all("\ufffd" not in piece for piece in pieces)


def test_special_tokens_are_hidden_and_final_flushes_an_unfinished_character(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    im_end = tokenizer.token_to_id("<|im_end|>")
    think = tokenizer.token_to_id("<think>")
    assert detokenizer.decode([think, im_end] + tokenizer.encode("ok").ids) == "<think>ok"
    first_byte_of_emoji = tokenizer.encode("🙂").ids[:1]
    assert detokenizer.text_piece([], first_byte_of_emoji, final=False) == ""
    assert detokenizer.text_piece([], first_byte_of_emoji, final=True) == "\ufffd"


def test_incomplete_tail_length():
    emoji = "🙂".encode()
    assert [incomplete_tail_length(emoji[:n]) for n in range(5)] == [0, 1, 2, 3, 0]
    assert incomplete_tail_length(b"ab\x80") == 0  # a stray continuation byte is not waiting for anything


def test_rejects_tokenizers_that_are_not_byte_level():
    with pytest.raises(ValueError, match="byte-level"):
        IncrementalDetokenizer(Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
