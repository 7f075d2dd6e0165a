"""TensorRT's environment: the package imports with tensorrt blocked and refuses in one line how to install it;
a plan from another TensorRT version or GPU is refused (pure Python sidecar check)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gamexport.errors import GamexportError
from gamexport.engines import trt as trt_mod
from gamexport.engines.trt import EngineMismatchError, TensorRTMissingError, check_engine_compatible

from fakes.trt import ENV


# ---- (a) no tensorrt --------------------------------------------------------------------------------------------
def test_imports_and_refuses_in_one_line_without_tensorrt():
    code = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'tensorrt':
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())
        import gamexport.engines.trt as m
        assert 'tensorrt' not in sys.modules and 'torch' not in sys.modules
        for call in (lambda: m.TrtRunner('model.fp32.plan', 'step.fp32.plan'),
                     lambda: m.build_engine('model.onnx', 'model.plan', None)):
            try:
                call()
            except m.TensorRTMissingError as e:
                print(e.line())
            else:
                raise SystemExit('no error')
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "TensorRT is not installed" in line and "pip install 'gamexport[tensorrt]'" in line


def test_missing_tensorrt_in_process(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt → ModuleNotFoundError
    with pytest.raises(TensorRTMissingError) as err:
        trt_mod.TrtRunner("a.plan", "b.plan")
    assert "\n" not in err.value.line() and "NVIDIA GPU" in err.value.line()
    assert isinstance(err.value, GamexportError)


# ---- (c) sidecar compatibility --------------------------------------------------------------------------------
def _meta(**over):
    meta = {"tensorrt_version": ENV["tensorrt_version"],
            "gpu": {"name": ENV["gpu_name"], "compute_capability": ENV["compute_capability"]}}
    meta.update(over)
    return meta


def test_compatible_engine_accepted():
    check_engine_compatible(_meta(), ENV, "model.fp32.plan")


@pytest.mark.parametrize("meta,needles", [
    (_meta(tensorrt_version="10.3.0"), ["built by TensorRT 10.3.0", "this machine has TensorRT 10.9.0.34",
                                        "tensorrt==10.3.0"]),
    (_meta(tensorrt_version="11.0.0"), ["built by TensorRT 11.0.0"]),
    (_meta(gpu={"name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"}),
     ["built for NVIDIA A100-SXM4-40GB (compute capability 8.0)", "this GPU is NVIDIA H100 80GB HBM3",
      "rebuild the engine on this GPU"]),
    (_meta(gpu={"name": "NVIDIA H100 PCIe", "compute_capability": "9.0"}), ["built for NVIDIA H100 PCIe"]),
])
def test_incompatible_engine_refused(meta, needles):
    with pytest.raises(EngineMismatchError) as err:
        check_engine_compatible(meta, ENV, "/x/model.fp32.plan")
    line = err.value.line()
    assert "\n" not in line and line.startswith("model.fp32.plan ")
    for needle in needles:
        assert needle.lower() in line.lower(), line
