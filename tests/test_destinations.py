"""gamexport/destinations.py on its own: what a path is, and which destinations each kind of command may take.

(Every rule through the CLI, with "nothing was written" checked: the class-1 rows of test_bad_input.py.)
"""

from __future__ import annotations

import json
import os

import pytest

from gamexport import destinations as d
from gamexport.errors import OutputError


def test_each_kind_is_recognised_by_its_marker(tmp_path, tiny_build):
    assert d.classify(tmp_path / "nope") == d.ABSENT
    assert d.classify(tmp_path) == d.EMPTY
    assert d.classify(tiny_build) == d.BUILD
    old = tmp_path / "old-build"             # a manifest written before the "kind" field: gamexport's schema
    old.mkdir()
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    del manifest["kind"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert d.classify(old) == d.BUILD
    (old / "manifest.json").write_text(json.dumps({"files": {}}))   # someone else's manifest
    assert d.classify(old) == d.OTHER
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"dataset": "x", "preset": "tiny", "seed": 0, "gamexport_version": "0"}))
    assert d.classify(run) == d.RUN
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench.json").write_text(json.dumps({"kind": "gamexport-bench"}))
    assert d.classify(bench) == d.BENCH
    repo = tmp_path / "repo"
    (repo / "theirs" / "1").mkdir(parents=True)
    assert d.classify(repo) == d.TRITON
    (repo / "README.txt").write_text("not a model")
    assert d.classify(repo) == d.OTHER


def test_special_files_and_links_are_never_destinations(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert d.classify(fifo) == d.SPECIAL
    with pytest.raises(OutputError, match="is a FIFO, not a regular file"):
        d.check_file(fifo)
    assert d.classify("/dev/null") == d.SPECIAL
    with pytest.raises(OutputError, match="is a character device"):
        d.check_file("/dev/null")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere.json")
    assert d.classify(link) == d.SYMLINK
    with pytest.raises(OutputError, match="is a symbolic link"):
        d.check_file(link)
    assert d.check_file(tmp_path / "new.json") == tmp_path.resolve() / "new.json"


@pytest.mark.parametrize("spelling", [".", "", "./", "src/..", "src/../."])
def test_every_spelling_of_a_folder_above_the_source_is_refused(tmp_path, monkeypatch, spelling):
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="holds the source"):
        d.check_folder(spelling, d.BUILD, guards={"the source": "src"})
    with pytest.raises(OutputError, match="is inside the source"):
        d.check_folder("src/out", d.BUILD, guards={"the source": tmp_path / "src"})
    assert d.check_folder("out", d.BUILD, guards={"the source": "src", "unused": None}) == tmp_path.resolve() / "out"
