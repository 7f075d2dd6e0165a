"""Datasets → documents → token stream → batches (gamexport.training.data)."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gamexport.errors import GamexportError
from gamexport.training import data
from gamexport.training.data import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not available")

WIKI = (" \n"
        " = First Article = \n"
        " \n"
        " Some text about it . \n"
        " \n"
        " = = Section = = \n"
        " \n"
        " More text . \n"
        " = Played , W = \n"            # a table row inside the article, not followed by a blank line
        " = Losses , D = \n"
        " \n"
        " = Second Article = \n"
        " \n"
        " <unk> text . \n")


# ---- documents -------------------------------------------------------------------------------------------------

def test_stories_split_at_endoftext_and_are_stripped():
    text = "One day.\nThe end.\n<|endoftext|>\nSecond story.\n<|endoftext|>\n\n<|endoftext|>\n"
    assert data.split_documents(text) == ["One day.\nThe end.", "Second story."]


def test_wikitext_articles_split_at_titles_only():
    articles = data.split_wikitext_articles(WIKI)
    assert len(articles) == 2
    assert articles[0].startswith(" \n = First Article = ")        # the preamble joins the first article
    assert " = = Section = = " in articles[0] and " = Played , W = " in articles[0]
    assert articles[1].startswith(" = Second Article = ")
    assert "".join(articles) == WIKI                                 # byte for byte
    assert data.split_documents(WIKI) == articles


def test_plain_text_splits_into_paragraphs():
    assert data.split_documents("a b\nc\n\n  \n d e \n\n\nf") == ["a b\nc", "d e", "f"]


def test_hold_out_tail_takes_the_last_five_percent_rounded_up():
    docs = [f"d{i}" for i in range(41)]
    train, valid = data.hold_out_tail(docs, 0.05)
    assert valid == ["d38", "d39", "d40"]                            # ceil(2.05) = 3
    assert train == docs[:38]
    assert data.hold_out_tail(["a", "b"], 0.05) == (["a"], ["b"])
    with pytest.raises(DataError, match="at least 2"):
        data.hold_out_tail(["only"], 0.05)


# ---- finding datasets ------------------------------------------------------------------------------------------

def test_text_file_holds_out_its_tail(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("".join(f"Story {i}.\n<|endoftext|>\n" for i in range(30)), encoding="utf-8")
    corpus = data.load_corpus(str(path))
    assert corpus.name == "stories"
    assert corpus.valid == ["Story 28.", "Story 29."]
    assert len(corpus.train) == 28 and corpus.train[-1] == "Story 27."
    assert "2 of 30" in corpus.held_out
    record = corpus.record()
    assert record["flavour"] == "user text: file stories.txt" and set(record["files"]) == {"stories.txt"}


def test_folder_with_train_and_valid(tmp_path):
    (tmp_path / "train.txt").write_text(WIKI, encoding="utf-8")
    (tmp_path / "valid.txt").write_text(" = Third = \n \n Valid text . \n", encoding="utf-8")
    corpus = data.load_corpus(tmp_path)
    assert len(corpus.train) == 2 and len(corpus.valid) == 1
    assert "valid.txt" in corpus.held_out


def test_folder_with_train_only_holds_out_its_tail(tmp_path):
    (tmp_path / "train.txt").write_text("p1\n\np2\n\np3\n", encoding="utf-8")
    corpus = data.load_corpus(tmp_path)
    assert corpus.train == ["p1", "p2"] and corpus.valid == ["p3"]


def test_bad_inputs_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # no ../shared/data from here
    with pytest.raises(DataError, match="--data-dir") as info:
        data.load_corpus("tinystories")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="neither"):
        data.load_corpus("no-such-dataset.txt")
    with pytest.raises(DataError, match="train.txt"):
        data.load_corpus(str(tmp_path))              # an empty folder
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(GamexportError, match="UTF-8"):
        data.load_corpus(str(tmp_path / "bin.txt"))
    with pytest.raises(DataError, match="wikitext-2"):
        data.load_corpus("wikitext2", data_dir=tmp_path)


@needs_shared
def test_shared_wikitext2_is_600_and_60_articles_of_the_tokenized_flavour():
    corpus = data.load_corpus("wikitext2", data_dir=SHARED)
    assert (len(corpus.train), len(corpus.valid)) == (600, 60)
    assert corpus.flavour == "wikitext-2 tokenized (v1, <unk>)"
    assert corpus.record()["name"] == "wikitext2"


@needs_shared
def test_shared_tinystories_holds_out_the_last_116_stories():
    corpus = data.load_corpus("tinystories", data_dir=SHARED)
    assert (len(corpus.train), len(corpus.valid)) == (2200, 116)
    assert corpus.train[0].startswith("One day, a little girl named Lily found a needle")
    assert "116 of 2,316" in corpus.held_out
    # The same file given as a path is recognised by its sha256.
    by_path = data.load_corpus(str(SHARED / "tinystories" / "train-subset.txt"))
    assert (by_path.name, by_path.flavour) == ("tinystories", corpus.flavour)


# ---- tokens and batches ----------------------------------------------------------------------------------------

class CharTokenizer:
    """Stand-in tokenizer: one id per character, id 1 = end of document."""
    eos_id = 1

    def encode_batch(self, texts):
        return [[ord(c) for c in t] for t in texts]


def test_encode_documents_closes_every_document():
    stream = data.encode_documents(CharTokenizer(), ["ab", "", "c"])
    assert stream.tolist() == [97, 98, 1, 1, 99, 1]
    assert stream.dtype == np.int32


def test_an_epoch_visits_every_full_chunk_once_in_a_seeded_order():
    tokens = np.arange(10 * 9 + 4, dtype=np.int32)         # 10 full chunks of T+1 = 9, and a 4-token tail
    T, B = 8, 3
    n = data.n_train_chunks(len(tokens), T)
    assert n == 10 and data.batches_per_epoch(n, B) == 4
    order = data.epoch_order(n, seed=5, epoch=2)
    assert np.array_equal(order, data.epoch_order(n, seed=5, epoch=2))
    assert not np.array_equal(order, data.epoch_order(n, seed=5, epoch=3))
    assert not np.array_equal(order, data.epoch_order(n, seed=6, epoch=2))
    firsts = []
    for b in range(4):
        x, y = data.train_batch(tokens, order, b, B, T)
        assert x.shape == y.shape == ((3, 8) if b < 3 else (1, 8))
        assert x.dtype == np.int64
        assert np.array_equal(x[:, 1:], y[:, :-1])            # targets are inputs shifted by one
        assert np.all(x[:, 0] % 9 == 0)                       # chunks start at multiples of T+1
        firsts += list(x[:, 0] // 9)
    assert sorted(firsts) == list(range(10))                  # every chunk once; the tail is never trained on


@settings(max_examples=60, deadline=None)
@given(n_tokens=st.integers(2, 300), T=st.integers(1, 40), B=st.integers(1, 5))
def test_evaluation_covers_the_whole_split(n_tokens, T, B):
    tokens = np.arange(n_tokens, dtype=np.int32)
    rebuilt, n_targets = [], 0
    for x, y in data.eval_batches(tokens, T, B):
        assert np.array_equal(x[:, 1:], y[:, :-1]) and x.shape[1] <= T
        for row_x, row_y in zip(x, y):
            rebuilt += [row_x[0], *row_y]
        n_targets += y.size
    # Every token in order, the final partial chunk included; only a lone last token (a "chunk" with no target)
    # is left out.
    expected = list(range(n_tokens))[:-1] if n_tokens % (T + 1) == 1 else list(range(n_tokens))
    assert rebuilt == expected
    assert n_targets == data.n_eval_targets(n_tokens, T)
    assert n_targets >= (n_tokens - 1) * T // (T + 1)


def test_hub_datasets_are_optional_and_fail_in_one_line(monkeypatch):
    """``--dataset hf:NAME`` needs the 'datasets' package and a hub; without them, one line with the fix."""
    import sys

    from gamexport.training.data import DataError, load_corpus

    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it raises ImportError
    with pytest.raises(DataError, match="needs the 'datasets' package") as err:
        load_corpus("hf:wikitext:wikitext-2-raw-v1")
    assert "\n" not in err.value.line()
    with pytest.raises(DataError, match="needs a dataset name"):
        load_corpus("hf:")


@pytest.mark.parametrize("kwargs,needle", [({"max_steps": 2**70}, "--max-steps"), ({"seed": -1}, "--seed -1"),
                                           ({"vocab_size": 10**9}, "--vocab-size"), ({"threads": 2**31}, "--threads")])
def test_train_api_checks_the_cli_bounds(tmp_path, kwargs, needle):
    """The Python API refuses what the CLI's options refuse, in one line, before reading data or writing --out."""
    from gamexport.errors import InputError
    from gamexport.training.loop import train

    with pytest.raises(InputError, match=needle):
        train(dataset="/dev/zero", out=tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_text_over_the_size_bound_is_refused_before_reading(tmp_path, monkeypatch):
    """A file over gamexport.limits.MAX_TEXT_BYTES (2 GiB; lowered here) is refused by its size, unread."""
    import gamexport.limits
    from gamexport.training.data import DataError, load_corpus

    path = tmp_path / "big.txt"
    path.write_text("one\n\ntwo\n\nthree\n")
    monkeypatch.setattr(gamexport.limits, "MAX_TEXT_BYTES", 8)
    with pytest.raises(DataError, match=r"big\.txt holds 16 bytes, more than the 8 read at once"):
        load_corpus(path)
