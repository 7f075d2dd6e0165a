"""Load a trained tokenizer (``tokenizer.json``) and turn text into token ids and back — without torch.

This is the inference-side half of tokenization, used by ``gamexport generate`` and the ONNX Runtime runner.
The training-side half (learning the byte-pair merges) lives in ``gamexport.training.tokenizer``.

The file is a Hugging Face ``tokenizers`` JSON file. Those that ``gamexport train`` writes are byte-level BPE:
every string round-trips exactly (``decode(encode(text)) == text``), and the special tokens ``<unk>`` and
``<|endoftext|>`` are single ids that are never split, also when they appear in a prompt.

    tok = Tokenizer.from_file("runs/demo/tokenizer.json")   # or the folder that holds it
    ids = tok.encode("Once upon a time")                       # [432, 460, 260, 404]
    text = tok.decode(ids)                                     # "Once upon a time"
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import GamexportError
from .layout import TOKENIZER as TOKENIZER_NAME
# End-of-document token names, in order of preference; gamexport's own tokenizers use the first.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "[EOS]")


class TokenizerError(GamexportError):
    """A tokenizer file that is missing or cannot be read."""


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the few operations gamexport needs."""

    def __init__(self, backend, path: Path | None = None):
        self._tok = backend          # a tokenizers.Tokenizer
        self.path = path
        self.eos_id: int | None = None
        for name in EOS_NAMES:
            token_id = backend.token_to_id(name)
            if token_id is not None:
                self.eos_id = token_id
                break

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read ``tokenizer.json``; ``path`` is the file or a folder holding one (a checkpoint or build folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_NAME
        if not path.is_file():
            raise TokenizerError(f"no tokenizer at {path}",
                                 "pass the tokenizer.json saved with the model (gamexport train writes one "
                                 "next to model.safetensors)")
        from .limits import MAX_TOKENIZER_BYTES

        size = path.stat().st_size
        if size > MAX_TOKENIZER_BYTES:
            raise TokenizerError(f"{path} is {size / 1024**2:,.0f} MiB, more than any tokenizer.json "
                                 f"({MAX_TOKENIZER_BYTES // 1024**2} MiB at most)",
                                 "pass the tokenizer.json saved with the model")
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as exc:
            raise TokenizerError("reading tokenizer.json needs the 'tokenizers' package",
                                 "pip install tokenizers") from exc
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception for malformed JSON
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TokenizerError(f"cannot read tokenizer {path}: {detail}",
                                 "the file is truncated or not a Hugging Face tokenizer.json; "
                                 "copy it again from the training run") from exc
        return cls(backend, path)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (a model's vocab_size must be at least this)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS is added (append ``eos_id`` yourself to close a document)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` for many texts at once (in parallel threads; used to tokenize a training corpus)."""
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Special tokens are written out (``<|endoftext|>``) unless skipped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def to_json(self) -> str:
        """The tokenizer.json text (what ``from_file`` reads)."""
        return self._tok.to_str(pretty=True)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, path={str(self.path)!r})"
