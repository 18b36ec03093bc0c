"""ASCII-128 character tokenizer: token id == ASCII code, in the Hugging Face format.

Built with `tokenizers`: a WordLevel model over the 128 characters, a pre-tokenizer that
isolates every character (`[\\s\\S]`, because `.` does not match a newline) and a `Fuse`
decoder so decoding joins characters without spaces.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 128
BOS = "\x02"  # ASCII STX/ETX: control characters that never occur in the book, so
EOS = "\x03"  # transformers has in-vocabulary special tokens and the text is untouched.
ENCODE_CHUNK = 1 << 16


def build_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(vocab={chr(i): i for i in range(VOCAB_SIZE)}, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   clean_up_tokenization_spaces=False, model_max_length=10**9)


def save_tokenizer(directory: Path) -> None:
    """Save in the Hugging Face format: PreTrainedTokenizerFast.from_pretrained(directory)."""
    build_tokenizer().save_pretrained(directory)


def encode(text: str) -> torch.Tensor:
    """The text's token ids as int64; the text must be ASCII (ids are then its byte values)."""
    if not text.isascii():
        raise ValueError("the ASCII-128 tokenizer only encodes 7-bit ASCII text")
    tokenizer = build_tokenizer()
    # In chunks: one encoding of the whole book holds ~100 MB of per-character offsets at once.
    chunks = [text[i:i + ENCODE_CHUNK] for i in range(0, len(text), ENCODE_CHUNK)] or [""]
    return torch.cat([torch.tensor(tokenizer.encode(chunk), dtype=torch.long) for chunk in chunks])
