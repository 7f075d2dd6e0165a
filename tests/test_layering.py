"""The layering of the house, read from the source: which rooms a room imports, function-level imports included.

Dependencies run one way — cli → the pipeline and the bench → engines → the core (``gamexport/``): the core never
imports an engine. An import added inside a function is as much a dependency as one at the top of a file, so the
walk below reads every import statement of every file, not only what importing the package loads.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import gamexport.parity

#: Everything gamexport/parity/ may import from the project: itself and the core it compares with (the model, the
#: float64 reference, the graph builder's emulations, the saved references' formats). Never an engine: the runners
#: it compares are opened by its callers (the build pipeline, the re-check) and handed in, and asked only through
#: the declared interface of gamexport.runtime.Runner.
PARITY_MAY_IMPORT = ("gamexport.parity", "gamexport.config", "gamexport.errors", "gamexport.fsutil",
                     "gamexport.graph", "gamexport.jsonfile", "gamexport.layout", "gamexport.manifest", "gamexport.model",
                     "gamexport.polyjson", "gamexport.reference", "gamexport.runtime", "gamexport.state",
                     "gamexport.tokenizer")


def imports(path: Path, package: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, a module of ``package``; relative imports
    resolved; ``from gamexport import x`` read as ``gamexport.x``; dynamic imports (``importlib.import_module``,
    ``__import__``) as ``<dynamic>``, which no allowlist holds."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base == "gamexport":
                yield from ((node.lineno, f"gamexport.{a.name}") for a in node.names if not a.name.startswith("__"))
            else:
                yield node.lineno, base
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__"):
            yield node.lineno, "<dynamic>"


def test_parity_imports_no_engine():
    """Every import in gamexport/parity/*.py — module level or inside a function — is of the parity package itself,
    the core on PARITY_MAY_IMPORT, or a third-party or standard library module: none of gamexport.engines (nor
    the CLI, the pipeline, the bench or training). Planting ``from gamexport.engines.eager import EagerRunner``
    inside a function of engine.py fails here, naming the file and line."""
    folder = Path(gamexport.parity.__file__).parent
    seen = set()
    for path in sorted(folder.glob("*.py")):
        for line, name in imports(path, "gamexport.parity"):
            assert name != "<dynamic>", f"gamexport/parity/{path.name}:{line} imports a module by name at run time"
            assert name.split(".")[0] not in ("engines", "cli", "training"), \
                f"gamexport/parity/{path.name}:{line} imports the bare top-level name {name}"
            if name.startswith("gamexport."):
                seen.add(name)
                assert any(name == ok or name.startswith(ok + ".") for ok in PARITY_MAY_IMPORT), \
                    f"gamexport/parity/{path.name}:{line} imports {name}"
    # the walk saw the imports it must see: relative ones (resolved), function-level ones, the core's
    assert {"gamexport.parity.metrics", "gamexport.parity.emulation", "gamexport.model",
            "gamexport.graph.emulate"} <= seen, seen


def test_the_import_reader_sees_what_a_planted_import_would_add(tmp_path):
    """The reader itself: function-level, relative (one and two dots), ``from gamexport import``, and dynamic
    imports are all reported with their absolute names."""
    source = tmp_path / "planted.py"
    source.write_text("import numpy\nfrom . import rows\nfrom .metrics import tolerance\n"
                      "from ..engines import ort\nfrom gamexport import engines\n"
                      "def f():\n    from gamexport.engines.eager import EagerRunner\n"
                      "    import importlib\n    importlib.import_module('gamexport.engines.ort')\n")
    assert [name for _, name in imports(source, "gamexport.parity")] == [
        "numpy", "gamexport.parity", "gamexport.parity.metrics", "gamexport.engines", "gamexport.engines",
        "gamexport.engines.eager", "importlib", "<dynamic>"]


def probes(path: Path) -> list[str]:
    """``getattr``/``hasattr`` calls and comparisons with a runtime's name in ``path``, as 'line: source'."""
    from gamexport.layout import RUNTIMES

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Compare) and set(RUNTIMES) & {
                c.value for o in (node.left, *node.comparators) for c in ast.walk(o) if isinstance(c, ast.Constant)}:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_parity_asks_runners_through_their_interface():
    """The modules of gamexport/parity/ that handle runners (the loop, the emulations) neither probe a runner's
    attributes nor switch on its backend's name: what differs between backends, the runner says through
    gamexport.runtime.Runner. Planting ``runner.runtime == "tensorrt"`` or ``getattr(runner, "matmul_ops", {})``
    back fails here."""
    folder = Path(gamexport.parity.__file__).parent
    for name in ("engine.py", "emulation.py"):
        assert probes(folder / name) == [], f"gamexport/parity/{name} probes a runner"
