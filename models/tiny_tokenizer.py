"""A byte-level tokenizer built in code: no training, no download, deterministic ids.

It lets the tiny and random-weight presets tokenize real prompts; ids 0..255 are the 256 byte
symbols, the chat-format special tokens follow.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")


def build_byte_tokenizer(special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: the 256 byte symbols, then ``special_tokens`` in order
    (``<|endoftext|>`` pads, ``<|im_end|>`` ends a turn)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for token in special_tokens:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(special_tokens))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in special_tokens if t not in ("<|im_end|>", "<|endoftext|>")],
    )
