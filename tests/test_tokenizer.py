"""The byte-level BPE tokenizer: trained by gamexport.training.tokenizer, loaded by gamexport.tokenizer (no torch)."""

import json
import random
import subprocess
import sys

import pytest

from gamexport.errors import GamexportError
from gamexport.tokenizer import Tokenizer, TokenizerError
from gamexport.training.tokenizer import EOS, UNK, save_tokenizer, train_tokenizer


def stories(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names, animals = ["Lily", "Tom", "Mia", "Ben"], ["cat", "dog", "bird", "frog"]
    out = []
    for _ in range(n):
        name, animal = rng.choice(names), rng.choice(animals)
        out.append(f"Once upon a time, {name} had a little {animal}.\n{name} said, \"I love my {animal}!\" "
                   f"The {animal} was happy.")
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tokenizer = train_tokenizer(stories(200), vocab_size=300)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(tokenizer, path)
    return Tokenizer.from_file(path)


def test_vocabulary_size_and_special_ids(tok):
    assert 258 < tok.vocab_size <= 300          # merges were learned, and no more than asked
    assert tok.token_to_id(UNK) == 0
    assert tok.token_to_id(EOS) == 1
    assert tok.eos_id == 1


@pytest.mark.parametrize("text", [
    "Once upon a time, Lily had a little cat.",
    "  two leading spaces,\ttabs\tand\nnew\n\nlines  ",
    "unseen: café, naïve, 東京, emoji 😀, zero-width\u200b joiner",
    " = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 ) \n",
])
def test_decode_inverts_encode(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids_even_inside_words(tok):
    ids = tok.encode(f"the end{EOS}Once<unk>x")
    assert ids.count(1) == 1 and ids.count(0) == 1
    assert tok.decode(ids) == f"the end{EOS}Once<unk>x"
    assert tok.decode(ids, skip_special_tokens=True) == "the endOncex"


def test_merges_shorten_frequent_words(tok):
    # "Once upon a time" is in every training story: byte-level would need 16 ids, BPE needs far fewer.
    assert len(tok.encode("Once upon a time")) <= 6


def test_training_is_deterministic():
    a = train_tokenizer(stories(100, seed=1), vocab_size=290)
    b = train_tokenizer(stories(100, seed=1), vocab_size=290)
    assert a.to_json() == b.to_json()


def test_from_file_accepts_a_folder(tok):
    same = Tokenizer.from_file(tok.path.parent)
    assert same.encode("Tom said hi") == tok.encode("Tom said hi")


def test_vocab_too_small_is_a_one_line_error():
    with pytest.raises(TokenizerError, match="at least 258"):
        train_tokenizer(stories(5), vocab_size=100)


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(GamexportError) as info:
        Tokenizer.from_file(tmp_path / "nope.json")
    assert isinstance(info.value, TokenizerError)
    assert "\n" not in str(info.value) and "tokenizer.json" in str(info.value)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"model": {"type": "Nonsense"}}), ""])
def test_corrupt_file_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_file(path)
    assert "\n" not in str(info.value) and "copy it again" in str(info.value)


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A tokenizer.json past MAX_TOKENIZER_BYTES is one line, and the tokenizers library never sees it (a sparse
    file: no bytes are written)."""
    import tokenizers

    from gamexport.limits import MAX_TOKENIZER_BYTES

    path = tmp_path / "tokenizer.json"
    with open(path, "wb") as f:
        f.truncate(MAX_TOKENIZER_BYTES + 1)
    monkeypatch.setattr(tokenizers.Tokenizer, "from_file", lambda *a: pytest.fail("the oversized file was parsed"))
    with pytest.raises(TokenizerError, match=r"more than any tokenizer\.json \(256 MiB at most\)") as info:
        Tokenizer.from_file(path)
    assert "\n" not in str(info.value)


def test_loading_never_imports_torch(tok):
    code = ("import sys; sys.modules['torch'] = None\n"       # any `import torch` now raises ImportError
            "from gamexport.tokenizer import Tokenizer\n"
            f"t = Tokenizer.from_file({str(tok.path)!r})\n"
            "print(t.decode(t.encode('Lily had a frog')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Lily had a frog"


def test_vocab_size_is_bounded():
    """Above gamexport.limits.MAX_VOCAB the tokenizer library would allocate its tables up front and abort the
    process (SIGABRT at 10**9); the trainer refuses first, in one line."""
    from gamexport.limits import MAX_VOCAB

    with pytest.raises(TokenizerError, match=f"vocab_size {MAX_VOCAB + 1} is too large"):
        train_tokenizer(["a b c"] * 3, MAX_VOCAB + 1)
