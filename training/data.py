"""Training data: text files → documents → one token stream → batches of (input, target) sequences.

The path from text to batches, in four steps:

1. **Find the text** (``load_corpus``). A dataset is named or given as a path:

   * ``wikitext2`` — ``DATA_DIR/wikitext-2/{train,valid}.txt``, the TOKENIZED WikiText-2 release (v1: rare words
     written as ``<unk>``, numbers split as ``@,@``). Its perplexities are not comparable to the raw flavour's
     (the paper's table), and every result records the flavour.
   * ``tinystories`` — ``DATA_DIR/tinystories/train-subset.txt``, stories separated by ``<|endoftext|>`` lines.
     There is no validation file, so the LAST 5% of the stories (rounded up, at least one) are held out for
     validation and never trained on, nor seen by the tokenizer.
   * a folder with ``train.txt`` and ``valid.txt`` (``test.txt`` is ignored): used as they are.
   * a folder with only ``train.txt``, or a single text file: its last 5% of documents is held out.

2. **Split into documents** (``split_documents``), by the first rule that applies to the text:
   ``<|endoftext|>`` separators (TinyStories); else WikiText top-level headings — a line `` = Title = `` between
   two blank lines starts a new article (600 / 60 / 60 articles in WikiText-2's train / valid / test; section
   headings `` = = Section = = `` and table rows such as `` = Played , W = `` stay inside their article); else
   blank lines (paragraphs).
   WikiText articles keep their text byte for byte; stories and paragraphs are stripped of surrounding whitespace.

3. **Tokenize** (``encode_documents``): every document, followed by the end-of-document token ``<|endoftext|>``,
   is appended to a single token stream — as the paper does, documents are simply concatenated.

4. **Batch** (``train_batch``, ``eval_batches``): the stream is cut into non-overlapping chunks of T+1 tokens;
   chunk[:-1] is the input and chunk[1:] the target, so every chunk starts from an empty context (the paper's
   scheme). Training drops the incomplete last chunk and visits the chunks in a shuffled order that is a pure
   function of (seed, epoch), so a run can be resumed from (epoch, batch index) alone. Validation covers the
   WHOLE split: every full chunk plus the final partial one; the first token of each chunk is context only
   (one token in T+1 is never a target, as in training; a final chunk of a single token has no target at all).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from gamexport.errors import GamexportError
from gamexport.fsutil import sha256_file

EOS = "<|endoftext|>"
VALID_FRACTION = 0.05
DATASET_NAMES = ("wikitext2", "tinystories")

WIKITEXT2_FLAVOUR = "wikitext-2 tokenized (v1, <unk>)"
TINYSTORIES_FLAVOUR = "TinyStories V1, first 2 MiB of TinyStories-train.txt (2,316 stories)"
# sha256 of the files in ../shared/data (see its README): a path that points at one of them is named by it.
KNOWN_FILES = {
    "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f": ("wikitext2", WIKITEXT2_FLAVOUR),
    "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8": ("wikitext2", WIKITEXT2_FLAVOUR),
    "ba02237f5747a07d420cb7329f721fdc51b6f5c35a81788b9c4bb871e15ff30a": ("tinystories", TINYSTORIES_FLAVOUR),
}


class DataError(GamexportError):
    """A dataset that cannot be found, read or split."""


@dataclass
class Corpus:
    """The documents of a training and a validation split, and where they came from."""

    name: str                      # "wikitext2", "tinystories" or the file/folder name
    flavour: str                   # what exactly the text is (recorded with every result)
    train: list[str]               # training documents
    valid: list[str]               # validation documents
    held_out: str                  # how the validation split was obtained, in words
    files: dict[str, str] = field(default_factory=dict)   # file name -> sha256 of its bytes

    def record(self) -> dict:
        """The ``"dataset"`` entry of config.json, metrics and summaries."""
        return {"name": self.name, "flavour": self.flavour, "held_out": self.held_out,
                "documents": {"train": len(self.train), "valid": len(self.valid)}, "files": dict(self.files)}


# ---- 1. finding the text ---------------------------------------------------------------------------------------

def default_data_dir() -> Path | None:
    """``../shared/data`` relative to the working directory, if it exists (the project's shared datasets)."""
    path = Path("..") / "shared" / "data"
    return path.resolve() if path.is_dir() else None


def check_text_file(path: Path) -> None:
    """Refuse, before reading, what is not a regular file (a device such as /dev/zero, a FIFO or a socket would be
    read until memory runs out, or block forever) and a file over ``gamexport.limits.MAX_TEXT_BYTES``."""
    import stat

    from gamexport.limits import MAX_TEXT_BYTES

    try:
        info = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}", "check the path and its permissions") from exc
    if not stat.S_ISREG(info.st_mode):
        kind = ("a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else
                "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else
                "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file")
        raise DataError(f"{path} is {kind}, not a regular text file", "pass a text file or a folder of text files")
    if info.st_size > MAX_TEXT_BYTES:
        raise DataError(f"{path} holds {info.st_size:,} bytes, more than the {MAX_TEXT_BYTES:,} read at once",
                        "train on a sample of it, at most 2 GiB")


def _read_text(path: Path) -> str:
    check_text_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start})", "convert the file to UTF-8") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}", "check the path and its permissions") from exc


def is_named(dataset: str | os.PathLike) -> bool:
    """True for the names of the shared datasets ("wikitext2" / "wikitext-2", "tinystories")."""
    return _key(dataset) in DATASET_NAMES


def _key(dataset: str | os.PathLike) -> str:
    return os.fspath(dataset).lower().replace("-", "").replace("_", "")


def load_corpus(dataset: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                valid_fraction: float = VALID_FRACTION) -> Corpus:
    """Resolve ``dataset`` (a name in ``DATASET_NAMES`` or a path) to its training and validation documents."""
    dataset = os.fspath(dataset)
    if dataset.startswith("hf:"):
        return load_hub_corpus(dataset[3:], valid_fraction)
    key = _key(dataset)
    if key in DATASET_NAMES:
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        if root is None:
            raise DataError(f"dataset {dataset!r} is looked up in a data folder, and ../shared/data does not exist",
                            "pass --data-dir FOLDER (holding wikitext-2/ or tinystories/) or a text file/folder "
                            "as --dataset PATH")
        if key == "wikitext2":
            return _load_wikitext2(root / "wikitext-2")
        return _load_tinystories(root / "tinystories" / "train-subset.txt", valid_fraction)
    path = Path(dataset).expanduser()
    if not path.exists():
        raise DataError(f"dataset {dataset!r} is neither {' nor '.join(DATASET_NAMES)} nor an existing path",
                        "pass wikitext2, tinystories, a text file, or a folder holding train.txt and valid.txt")
    if path.is_dir():
        return _load_folder(path.resolve(), valid_fraction)
    return _load_file(path.resolve(), valid_fraction)


def load_hub_corpus(spec: str, valid_fraction: float = VALID_FRACTION) -> Corpus:
    """``hf:NAME[:CONFIG]`` — a Hugging Face ``datasets`` dataset with a ``text`` column, where a hub is reachable.

    Optional: nothing in gamexport needs it, and it is the only loader that touches the network. The
    ``validation`` split is used when the dataset has one, else the tail of ``train`` is held out. For the
    paper's WikiText-2 (raw) that is ``hf:wikitext:wikitext-2-raw-v1``; TinyStories is ``hf:roneneldan/TinyStories``.
    """
    name, _, config = spec.partition(":")
    if not name:
        raise DataError("hf: needs a dataset name", "e.g. --dataset hf:wikitext:wikitext-2-raw-v1")
    try:
        import datasets
    except ImportError:
        raise DataError("--dataset hf:… needs the 'datasets' package", "pip install datasets (and network access "
                        "to the Hugging Face hub), or pass a local text file or folder") from None
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as exc:  # network, missing dataset, auth: all end the same way for the user
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot load {name!r} from the Hugging Face hub: {first}",
                        "check the name and your network, or download the text and pass it as a path") from exc
    if "train" not in loaded or "text" not in loaded["train"].column_names:
        raise DataError(f"{name!r} has no train split with a 'text' column", "pass a dataset of plain text")
    train = [t for t in loaded["train"]["text"] if t and t.strip()]
    if "validation" in loaded:
        valid = [t for t in loaded["validation"]["text"] if t and t.strip()]
        held_out = "the dataset's own validation split"
    else:
        train, valid = hold_out_tail(train, valid_fraction, f"hf:{spec}")
        held_out = f"the last {valid_fraction:.0%} of the train split's documents"
    return Corpus(name=f"hf:{spec}", flavour=f"Hugging Face dataset {name}" + (f" ({config})" if config else ""),
                  train=train, valid=valid, held_out=held_out)


def _load_wikitext2(folder: Path) -> Corpus:
    for split in ("train", "valid"):
        if not (folder / f"{split}.txt").is_file():
            raise DataError(f"{folder / f'{split}.txt'} does not exist",
                            "pass --data-dir the folder that holds wikitext-2/{train,valid}.txt")
    corpus = _load_folder(folder.resolve(), VALID_FRACTION)
    corpus.name, corpus.flavour = "wikitext2", WIKITEXT2_FLAVOUR
    corpus.held_out = "valid.txt, WikiText-2's own validation split (test.txt is not used)"
    return corpus


def _load_tinystories(path: Path, valid_fraction: float) -> Corpus:
    if not path.is_file():
        raise DataError(f"{path} does not exist", "pass --data-dir the folder that holds tinystories/train-subset.txt")
    corpus = _load_file(path.resolve(), valid_fraction)
    corpus.name, corpus.flavour = "tinystories", TINYSTORIES_FLAVOUR
    return corpus


def _named(files: dict[str, str], fallback_name: str, fallback_flavour: str) -> tuple[str, str]:
    for sha in files.values():
        if sha in KNOWN_FILES:
            return KNOWN_FILES[sha]
    return fallback_name, fallback_flavour


def _load_folder(folder: Path, valid_fraction: float) -> Corpus:
    train_path = folder / "train.txt"
    if not train_path.exists():
        raise DataError(f"{folder} has no train.txt", "a dataset folder needs train.txt (and valid.txt); "
                                                      "or pass a single text file")
    valid_path = next((folder / n for n in ("valid.txt", "validation.txt") if (folder / n).exists()), None)
    if valid_path is None:
        corpus = _load_file(train_path, valid_fraction)
        corpus.name = folder.name
        return corpus
    train = split_documents(_read_text(train_path))
    valid = split_documents(_read_text(valid_path))
    if not train or not valid:
        empty = train_path if not train else valid_path
        raise DataError(f"{empty} holds no text", "fill it or pass another dataset")
    files = {train_path.name: sha256_file(train_path), valid_path.name: sha256_file(valid_path)}
    name, flavour = _named(files, folder.name, f"user text: folder {folder.name}/ (train.txt, {valid_path.name})")
    return Corpus(name=name, flavour=flavour, train=train, valid=valid,
                  held_out=f"{valid_path.name} (a separate validation file)", files=files)


def _load_file(path: Path, valid_fraction: float) -> Corpus:
    docs = split_documents(_read_text(path))
    train, valid = hold_out_tail(docs, valid_fraction, source=path)
    files = {path.name: sha256_file(path)}
    name, flavour = _named(files, path.stem, f"user text: file {path.name}")
    return Corpus(name=name, flavour=flavour, train=train, valid=valid, files=files,
                  held_out=(f"the last {valid_fraction:.0%} of the documents of {path.name}: "
                            f"{len(valid):,} of {len(docs):,} (documents {len(train) + 1:,}-{len(docs):,}), "
                            "never trained on"))


def hold_out_tail(docs: list[str], fraction: float, source: Path | str = "the text") -> tuple[list[str], list[str]]:
    """Split off the last ``ceil(fraction · n)`` documents (at least one) as the validation split."""
    if len(docs) < 2:
        raise DataError(f"{source} holds {len(docs)} document(s); a validation split needs at least 2",
                        "separate documents with <|endoftext|> lines or blank lines, "
                        "or pass a folder with train.txt and valid.txt")
    n_valid = min(len(docs) - 1, max(1, math.ceil(fraction * len(docs))))
    return docs[:-n_valid], docs[-n_valid:]


# ---- 2. documents ----------------------------------------------------------------------------------------------

_WIKI_TITLE = re.compile(r"^ = (?!=).*(?<!=) = $")   # " = Title = ", not " = = Section = = "


def split_documents(text: str) -> list[str]:
    """Cut text into documents: by ``<|endoftext|>``, else WikiText articles, else blank-line paragraphs."""
    if EOS in text:
        return [doc.strip() for doc in text.split(EOS) if doc.strip()]
    lines = _lines(text)
    if _title_lines(lines):
        return split_wikitext_articles(text)
    return [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _lines(text: str) -> list[str]:
    """Lines split at "\\n" only, each keeping its "\\n" ("".join gives back the text)."""
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _title_lines(lines: list[str]) -> list[int]:
    """Indices of WikiText article titles: a `` = Title = `` line between blank lines (or the file's start)."""
    def blank(i: int) -> bool:
        return i < 0 or (i < len(lines) and not lines[i].strip())
    return [i for i, line in enumerate(lines)
            if _WIKI_TITLE.match(line.rstrip("\n")) and blank(i - 1) and blank(i + 1) and i + 1 < len(lines)]


def split_wikitext_articles(text: str) -> list[str]:
    """WikiText articles, byte for byte: a new one starts at each title line (see ``_title_lines``).

    Lines before the first title belong to the first article; concatenating the result gives back ``text``.
    """
    lines = _lines(text)
    starts = _title_lines(lines)
    if not starts:
        return [text] if text.strip() else []
    starts[0] = 0
    bounds = starts + [len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


# ---- 3. tokens -------------------------------------------------------------------------------------------------

def encode_documents(tokenizer, docs: list[str]) -> np.ndarray:
    """One int32 token stream: each document's ids followed by the end-of-document id."""
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no <|endoftext|> token", "train a new tokenizer with gamexport train")
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    parts = []
    for ids in tokenizer.encode_batch(docs):
        parts.append(np.asarray(ids, dtype=np.int32))
        parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


# ---- 4. batches ------------------------------------------------------------------------------------------------

def n_train_chunks(n_tokens: int, seq_len: int) -> int:
    """Full, non-overlapping chunks of seq_len+1 tokens in the stream (the partial tail is not trained on)."""
    return n_tokens // (seq_len + 1)


def batches_per_epoch(n_chunks: int, batch_size: int) -> int:
    """Batches in one pass over the chunks; the last batch may be smaller."""
    return math.ceil(n_chunks / batch_size)


def epoch_order(n_chunks: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the chunks: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_chunks)


def train_batch(tokens: np.ndarray, order: np.ndarray, batch_index: int, batch_size: int,
                seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``batch_index`` of an epoch whose chunk order is ``order``: inputs and targets, int64 (b, T)."""
    chunk_ids = order[batch_index * batch_size:(batch_index + 1) * batch_size]            # (b,)
    starts = chunk_ids * (seq_len + 1)                                                      # (b,)
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int64)      # (b, T+1)
    return rows[:, :-1], rows[:, 1:]                                                        # 2 × (b, T)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every chunk of the split: full chunks of T+1 in batches, then the final partial chunk (if ≥ 2 tokens)."""
    n_full = n_train_chunks(len(tokens), seq_len)
    order = np.arange(n_full)
    for b in range(batches_per_epoch(n_full, batch_size)):
        yield train_batch(tokens, order, b, batch_size, seq_len)
    tail = tokens[n_full * (seq_len + 1):].astype(np.int64)
    if len(tail) >= 2:
        yield tail[None, :-1], tail[None, 1:]                                                # 2 × (1, t)


def n_eval_targets(n_tokens: int, seq_len: int) -> int:
    """How many tokens ``eval_batches`` predicts: n_tokens minus one context-only token per chunk."""
    n_full = n_train_chunks(n_tokens, seq_len)
    tail = n_tokens - n_full * (seq_len + 1)
    return n_full * seq_len + max(0, tail - 1)
