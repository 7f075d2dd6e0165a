"""Train the byte-pair-encoding (BPE) tokenizer that a GAM model reads and writes.

What we build, and how it differs from the paper:

* Model: BPE from Hugging Face ``tokenizers``, trained on the TRAINING split only. (The paper's reference code
  trains it on every split, validation and test included, which leaks held-out text into the vocabulary.)
* Pre-tokenizer: byte-level (GPT-2 style) instead of the paper's whitespace pre-tokenizer. Every byte has a
  token, so nothing is ever unknown, and the byte-level decoder puts spaces and newlines back exactly:
  ``decode(encode(text)) == text``. The paper's whitespace pre-tokenizer drops the spaces, so its decoded text
  reads "Once upon a time , there" — fine for perplexity, poor for generation.
* Special tokens: ``<unk>`` (id 0; WikiText-2's tokenized flavour writes rare words as the literal ``<unk>``,
  which stays one token) and ``<|endoftext|>`` (id 1), which closes every document in the token stream.
  Both are matched as whole strings in any input and never split.

The result is saved as ``tokenizer.json`` and read back by ``gamexport.tokenizer.Tokenizer`` (no torch needed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from gamexport.fsutil import atomic_write_text
from gamexport.limits import MAX_VOCAB
from gamexport.tokenizer import Tokenizer, TokenizerError

UNK = "<unk>"
EOS = "<|endoftext|>"
SPECIAL_TOKENS = (UNK, EOS)   # ids 0 and 1, in this order


def train_tokenizer(documents: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Learn byte-level BPE merges from ``documents`` until the vocabulary holds ``vocab_size`` ids.

    The vocabulary starts with the 2 special tokens and the 256 byte symbols, so ``vocab_size`` must be at
    least 258, and at most ``gamexport.limits.MAX_VOCAB`` (2**20: the library allocates its tables up front and
    aborts the whole process when that fails). A small corpus may run out of pairs seen ``min_frequency`` times before that size is reached:
    the tokenizer's real size (``Tokenizer.vocab_size``) is what the model's embedding must use.
    Training is deterministic: the same documents give the same tokenizer.json.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    base = len(SPECIAL_TOKENS) + 256
    if vocab_size < base:
        raise TokenizerError(f"tokenizer vocab_size {vocab_size} is too small",
                             f"byte-level BPE needs at least {base} ids (256 bytes + {len(SPECIAL_TOKENS)} specials)")
    if vocab_size > MAX_VOCAB:
        raise TokenizerError(f"tokenizer vocab_size {vocab_size} is too large",
                             f"use at most {MAX_VOCAB} ids (the tokenizer library aborts allocating more)")
    tok = HFTokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} should have id {i}"
    return Tokenizer(tok)


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> Path:
    """Write ``tokenizer.json`` atomically (a reader never sees a half-written file)."""
    return atomic_write_text(path, tokenizer.to_json())
