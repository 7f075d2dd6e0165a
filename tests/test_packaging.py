"""One import package; optional dependencies stay optional; the ONNX Runtime path never imports torch."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import gamexport


def _python(code: str, cwd: str = "/") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_bare_top_level_names_are_not_importable():
    for name in ("engines", "training", "cli"):
        proc = _python(f"import {name}")
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, name


def test_subpackages_install_under_gamexport():
    import gamexport.cli
    import gamexport.engines
    import gamexport.training  # noqa: F401

    assert gamexport.engines.__name__ == "gamexport.engines"





def test_every_module_imports_without_optional_dependencies(blocker):
    """Polygraphy-style: importing any module must not need tensorrt, pycuda, matplotlib or onnxruntime_genai."""
    import gamexport.cli
    import gamexport.engines
    import gamexport.training

    modules = []
    for pkg in (gamexport, gamexport.engines, gamexport.cli, gamexport.training):
        modules += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    assert "gamexport.engines.ort" in modules and "gamexport.cli.main" in modules
    code = blocker({"tensorrt", "pycuda", "cuda", "matplotlib", "onnxruntime_genai"}) + textwrap.dedent(f"""
        import importlib
        for name in {modules!r}:
            importlib.import_module(name)
        print('ok')
    """)
    proc = _python(code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_ort_generation_runs_with_torch_blocked(tiny_build, blocker):
    code = blocker({"torch"}) + textwrap.dedent(f"""
        import sys
        sys.argv = ['gamexport', 'generate', {str(tiny_build)!r}, '--ids', '1,2,3', '--max-new-tokens', '5']
        from gamexport.cli.main import main
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        assert 'torch' not in sys.modules
    """)
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().split(",")) == 5


def test_ort_generation_imports_neither_onnx_nor_pydantic(tiny_build, blocker):
    """The cold start of `gamexport generate` on a build folder: the step graph is read without onnx
    (gamexport.onnxfile), and plain option values are coerced without typer's pydantic adapters
    (gamexport.cli.coercion). Importing either here fails the command; the output is still the ids."""
    code = blocker({"torch", "onnx", "pydantic"}) + textwrap.dedent(f"""
        import sys
        sys.argv = ['gamexport', 'generate', {str(tiny_build)!r}, '--ids', '1,2,3', '--max-new-tokens', '5',
                    '--temperature', '0.5', '--top-k', '7', '--top-p', '0.9', '--seed', '3', '-j', '1']
        from gamexport.cli.main import main
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        assert not {{'torch', 'onnx', 'pydantic'}} & set(sys.modules), sorted(sys.modules)
    """)
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().split(",")) == 5


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "gamexport")
    if not os.path.exists(script):
        pytest.skip(f"no console script beside {sys.executable}: gamexport is not pip-installed in this environment")
    proc = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and gamexport.__version__ in proc.stdout
