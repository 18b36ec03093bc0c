import random

import pytest
from transformers import PreTrainedTokenizerFast

from runner.data.tokenizer import VOCAB_SIZE, build_tokenizer, encode, save_tokenizer

ALL_ASCII = "".join(chr(i) for i in range(128))


def test_token_id_is_ascii_code():
    assert build_tokenizer().encode(ALL_ASCII) == list(range(128))
    assert len(build_tokenizer()) == VOCAB_SIZE == 128


def test_round_trip():
    """decode(encode(s)) == s: the edge cases (empty, runs of spaces and newlines, every character)
    and 200 random ASCII strings."""
    tokenizer, rng = build_tokenizer(), random.Random(0)
    edge_cases = ["In my younger", "a\nb\n\n", " spaced  out ", "don 't . , ! n't", ALL_ASCII, ""]
    random_texts = ["".join(chr(rng.randrange(128)) for _ in range(rng.randrange(1, 300))) for _ in range(200)]
    for text in edge_cases + random_texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text, repr(text)


def test_saved_in_hugging_face_format(tmp_path):
    save_tokenizer(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert loaded.encode("Gatsby\n") == [ord(c) for c in "Gatsby\n"]
    assert loaded.decode(loaded.encode("In my younger")) == "In my younger"


def test_encode_refuses_non_ascii():
    assert encode("Hi\n").tolist() == [72, 105, 10]
    with pytest.raises(ValueError, match="ASCII"):
        encode("caf\u00e9")
