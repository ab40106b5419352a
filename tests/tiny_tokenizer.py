"""A byte-level tokenizer small enough for the tiny test models (257 ids: 256 bytes and an EOS)."""

from __future__ import annotations

from pathlib import Path


def save_byte_tokenizer(path: Path) -> None:
    """Write tokenizer files to ``path``: every UTF-8 byte is one token (no merges), ``<eos>`` is 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)
