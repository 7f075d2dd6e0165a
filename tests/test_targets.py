"""The target registry (gamexport/targets.py): one planner and one opener for the build, the re-check and the bench,
and no backend-name switch or runner probe in the rooms that use it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gamexport
from gamexport.layout import ENGINES, PRECISIONS, RUNTIMES
from gamexport.targets import TARGETS, UNSUPPORTED, plan


def test_every_unsupported_pair_is_skipped_with_its_reason_by_build_and_bench():
    """The build's plan and the bench's plan skip the same CPU pairs with the registry's reason, run the rest, and
    the bf16 graphs the CPU cannot run are still checked by a structural run."""
    from gamexport.bench.runtimes import runner_plan

    build = plan(PRECISIONS)
    assert build.pairs == [("onnxruntime-cpu", p) for p in PRECISIONS if p != "bf16"]
    assert build.skipped == [{"runtime": "onnxruntime-cpu", "precision": "bf16",
                              "reason": UNSUPPORTED[("onnxruntime-cpu", "bf16")]}]
    assert build.structural == [("onnxruntime-cpu", "bf16")]
    assert [row["runtime"] for row in build.elsewhere] == ["onnxruntime-cuda", "onnxruntime-trt", "tensorrt"]
    pairs, skipped = runner_plan(("fp32", "int8"), compile=False)
    assert pairs == [("eager", "fp32"), ("onnxruntime-cpu", "fp32"), ("onnxruntime-cpu", "int8")]
    reasons = {(row["runtime"], row.get("precision")): row["reason"] for row in skipped}
    assert reasons[("onnxruntime-cpu", "bf16")] == UNSUPPORTED[("onnxruntime-cpu", "bf16")]
    assert reasons[("onnxruntime-cpu", "fp16")] == "not requested (--precision)"
    assert {r for r, p in reasons if p is None} == {"onnxruntime-cuda", "onnxruntime-trt", "tensorrt"}


def test_a_plan_runs_only_what_was_asked():
    """Precisions that were not asked for are neither run nor listed; only an asked-for bf16 gets a structural run."""
    asked = plan(("fp32", "int8"))
    assert asked.pairs == [("onnxruntime-cpu", "fp32"), ("onnxruntime-cpu", "int8")]
    assert asked.skipped == [] and asked.structural == []
    listed = plan(("fp32",), listed=PRECISIONS)  # the bench lists every precision: bf16 skipped, not checked
    assert ("onnxruntime-cpu", "bf16", UNSUPPORTED[("onnxruntime-cpu", "bf16")]) in [
        (r["runtime"], r["precision"], r["reason"]) for r in listed.skipped] and listed.structural == []


def test_every_target_names_a_known_runtime_engine_device_and_precision():
    for name, target in TARGETS.items():
        assert name == target.runtime and name in RUNTIMES
        assert target.engine in (None, *ENGINES) and target.device in ("cpu", "cuda")
        assert set(target.unsupported) <= set(PRECISIONS) and set(target.structural) <= set(target.unsupported)


def test_an_engine_no_target_of_the_device_runs_is_refused():
    from gamexport.errors import InputError

    with pytest.raises(InputError, match="TensorRT runs on NVIDIA GPUs only"):
        plan(("fp32",), ("tensorrt",), "cpu")
    with pytest.raises(InputError, match="--cuda-graph applies to TensorRT"):
        plan(("fp32",), ("onnxruntime",), "cpu", cuda_graph=True)


# ---- no backend-name switch or runner probe outside the registry ---------------------------------------------------
ROOT = Path(gamexport.__file__).parent
#: The rooms that plan and open runners through the registry, and (file, function) pairs of the bench's plan/open.
USERS = sorted((ROOT / "pipeline").glob("*.py"))
BENCH_FUNCTIONS = ("runner_plan", "gpu_skip_reason", "open_runner")
BACKEND_NAMES = set(RUNTIMES) | set(ENGINES)


def switches(tree: ast.AST) -> list[str]:
    """Comparisons against a runtime or engine name (``runtime == "tensorrt"``, ``"tensorrt" in engines``,
    ``x in ("onnxruntime-cpu", …)``) and ``getattr``/``hasattr`` calls, as 'line: source'."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = [c.value for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)]
            if BACKEND_NAMES & set(names):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("path", USERS, ids=lambda p: p.name)
def test_the_pipeline_asks_the_registry_not_the_backend_name(path):
    assert switches(ast.parse(path.read_text(encoding="utf-8"))) == [], f"{path.name} switches on a backend"


def test_the_bench_plans_and_opens_through_the_registry():
    tree = ast.parse((ROOT / "bench" / "runtimes.py").read_text(encoding="utf-8"))
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert set(BENCH_FUNCTIONS) <= set(functions)
    for name in BENCH_FUNCTIONS:
        assert switches(functions[name]) == [], f"bench/runtimes.py {name} switches on a backend"


def test_only_a_target_that_may_fail_becomes_a_skipped_row(monkeypatch):
    """The bench times each target; a failure of eager-compile (torch.compile needs a C++ toolchain) is a skipped
    row naming it, while the same failure of any other target is a bug and is raised (Target.may_fail)."""
    from types import SimpleNamespace

    from gamexport.bench import runtimes

    class Broken:
        def close(self):
            pass

    def failing_rows(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(runtimes, "open_runner", lambda *args: Broken())
    monkeypatch.setattr(runtimes, "prefill_rows", failing_rows)
    ckpt, said = SimpleNamespace(config=None), []
    prefill, decode, skipped = runtimes.runtime_rows([("eager-compile", "fp32")], ckpt, None, {}, None, 1, (),
                                                     said.append)
    assert prefill == decode == [] and skipped == [{"runtime": "eager-compile", "precision": "fp32",
                                                    "reason": "torch.compile failed: RuntimeError: no C++ compiler"}]
    assert said[0].startswith("compile: torch.compile") and "skipped" in said[-1]
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        runtimes.runtime_rows([("onnxruntime-cpu", "fp32")], ckpt, None, {}, None, 1, (), said.append)
