"""``gamexport bench``: a quick smoke run writes a well-formed bench.json and plots; the FLOP formulas are right.

Timings are never asserted: only that every measured number exists, is positive, and that every fraction is the
value divided by the limit it names.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gamexport.config import PRESETS, GAMConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_app() -> typer.Typer:
    """The bench command in an app of its own (cli/main.py registers it as ``gamexport bench``)."""
    from gamexport.cli.bench import bench

    app = typer.Typer(pretty_exceptions_show_locals=False)

    @app.callback()
    def _root() -> None:
        """gamexport"""

    app.command("bench")(bench)
    return app


def invoke(*args: str):
    return CliRunner().invoke(bench_app(), ["bench", *args], env={"GAMEXPORT_DEBUG": ""})


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict, object]:
    out = tmp_path_factory.mktemp("bench") / "out"
    # One thread: two threads of torch on cores other work is using stall at every OpenMP barrier.
    result = invoke("--preset", "tiny", "--quick", "--max-t", "32", "--threads", "1", "--out", str(out))
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    return out, json.loads((out / "bench.json").read_text()), result


def _find_row(bench: dict, mode: str, runtime: str, batch: int, seq_len: int, head: str | None = None) -> dict:
    return next(r for r in bench[mode] if r["runtime"] == runtime and r["precision"] == "fp32"
                and r["batch"] == batch and r["seq_len"] == seq_len and r.get("head_positions") == head)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_bench_json_structure(quick):
    out, bench, result = quick
    assert bench["schema_version"] == 1 and bench["kind"] == "gamexport-bench" and bench["quick"] is True
    assert bench["threads"] == 1 and bench["machine"]["threads"] == 1
    assert {"limits", "prefill", "decode", "ceilings", "paired", "scaling", "training", "startup", "skipped", "noisy",
            "flops_per_token",
            "weight_bytes_per_step", "config", "source", "machine", "plots"} <= set(bench)
    assert bench["config"]["d_model"] == PRESETS["tiny"].d_model and bench["source"]["trained"] is False

    lim = bench["limits"]
    names = {name: [c["name"] for c in lim[name]["candidates"]] for name in ("compute", "bandwidth", "batched")}
    # torch is installed here, so every candidate the issue names is measured.
    assert {"onnxruntime 2048x2048x2048", "onnxruntime 2048x2048x2048 inputs", "torch.mm 2048x2048x2048"} \
        <= set(names["compute"])
    d = PRESETS["tiny"].d_model
    assert f"onnxruntime ffn up 64x{d}x{4 * d}" in names["compute"]            # the model's own prefill shapes
    assert names["bandwidth"][0].startswith("onnxruntime GEMV") and names["bandwidth"][1].startswith("stream read")
    stream = lim["bandwidth"]["candidates"][1]
    llc = bench["machine"]["llc_bytes"]
    assert stream["bytes"] >= (4 * llc if llc else 256 * 2**20) - 4 and "torch.sum" in stream["engine"]
    batched = lim["batched"]["candidates"]   # the GEMV's weights at M = 32, and the model's own weight MatMuls
    assert [c["shape"][0] for c in batched] == [32, 32, 32]
    assert batched[0]["shape"][1:] == lim["bandwidth"]["candidates"][0]["shape"][1:]
    assert batched[2]["name"].startswith("onnxruntime weight MatMuls")
    for name, key in (("compute", "gflops"), ("bandwidth", "gbps"), ("batched", "gflops")):
        assert _positive(lim[name][key]) and _positive(lim[name]["p50_ms"]) and lim[name]["runs"] >= 1
        # The best candidate, each candidate at the higher of its start and end measurements.
        assert lim[name][key] == max(c[key] for c in lim[name]["candidates"])
        assert lim[name]["best"] == max(lim[name]["candidates"], key=lambda c: c[key])["name"]
        assert lim[name][key] == max(lim[name]["measured"].values())
        for c in lim[name]["candidates"]:
            assert c[key] == max(c["measured"].values())
            if key == "gflops" and "weight MatMuls" in c["name"]:   # the model's own GEMMs at M = 32
                cfg = bench["config"]
                d, S, V, L = cfg["d_model"], cfg["n_slots"], cfg["vocab_size"], cfg["n_layers"]
                elements = L * (2 * S * d + 2 * d * d + 8 * d * d) + d * V
                assert c["shape"][0] == 32 and c["flops"] == 2 * 32 * elements
                assert c["gflops"] == pytest.approx(c["flops"] / (c["p50_ms"] / 1e3) / 1e9)
            elif key == "gflops":   # recompute each candidate from its timing
                M, K, N = c["shape"]
                assert c["gflops"] == pytest.approx(2 * M * K * N / (c["p50_ms"] / 1e3) / 1e9)
            else:
                assert c["gbps"] == pytest.approx(c["bytes"] / (c["p50_ms"] / 1e3) / 1e9)
    gemv = lim["bandwidth"]["candidates"][0]
    K = gemv["shape"][1]
    assert abs(gemv["bytes"] - 4 * bench["parameters"]) <= 4 * K  # as many bytes as the model has

    # No fraction above 1.0 without its limit marked invalid, naming the row; a valid limit is beaten by none.
    rows = [*bench["prefill"], *bench["decode"], *bench["ceilings"]["rows"]]
    beaten = {r["limit"] for r in rows if r["fraction"] > 1.0}
    assert bench["limits_valid"] == (not beaten) == (bench["invalid_limits"] == [])
    for r in rows:
        assert r["limit_valid"] == (not r.get("limit_beaten_by"))
    assert lim["compute"]["valid"] == ("compute" not in beaten)
    # Batched rows of a reduced precision are measured against the batched limit over their own weight bytes.
    assert lim["batched_by_precision"]["fp32"]["gflops"] == lim["batched"]["gflops"]
    int8_batched = lim["batched_by_precision"]["int8"]
    assert int8_batched["shape"][2] == lim["bandwidth_by_precision"]["int8"]["candidates"][0]["shape"][2] or \
        int8_batched["best"].startswith("onnxruntime int8 ")
    # Each integer precision's compute and batched limits count its own integer GEMM beside the fp32 candidates.
    for p in ("int8", "int8-dyn", "int4"):
        cands = [c["name"] for c in lim["compute_by_precision"][p]["candidates"]]
        assert set(names["compute"]) < set(cands) and f"onnxruntime {p} ffn up 64x{d}x{4 * d}" in cands
        assert any(c["name"].startswith(f"onnxruntime {p} 32x") for c in lim["batched_by_precision"][p]["candidates"])
        assert lim["compute_by_precision"][p]["gflops"] >= lim["compute"]["gflops"]

    load = bench["load"]  # other processes' CPU time during the run, as the comparison driver measures it
    assert isinstance(load["other_cpu_cores"], float) and load["other_cpu_cores"] >= 0
    assert load["busy"] == (load["other_cpu_cores"] > 0.2) and _positive(load["wall_s"])
    assert set(bench["machine"]["cpu_flags"]) >= {"avx2", "avx512f", "avx512_vnni", "amx_tile"}

    # Every runtime and precision this CPU has, with prefill at T=min(64, P) (and 256 capped) plus batched.
    pairs = {(r["runtime"], r["precision"]) for r in bench["prefill"]}
    assert pairs == {("eager", "fp32"), ("onnxruntime-cpu", "fp32"), ("onnxruntime-cpu", "fp16"),
                     ("onnxruntime-cpu", "int8"), ("onnxruntime-cpu", "int8-dyn"), ("onnxruntime-cpu", "int4")}
    assert {(r["batch"], r["seq_len"], r["head_positions"]) for r in bench["prefill"]} == {
        (1, 64, "all"), (8, 64, "all"), (1, 64, "last")}   # "last": prefill for generation, through the step call
    assert {r["batch"] for r in bench["decode"]} == {1, 8, 32}
    assert {r["runtime"] for r in bench["skipped"]} >= {"eager-compile", "onnxruntime-cuda", "tensorrt"}
    assert all(r["reason"] for r in bench["skipped"])

    for row in [*bench["prefill"], *bench["decode"]]:
        for key in ("p50_ms", "p90_ms", "tokens_per_s", "achieved", "limit_value", "fraction"):
            assert _positive(row[key]), (row["runtime"], row["precision"], key, row[key])
        assert isinstance(row["noisy"], bool) and row["threads"] == 1
        assert row["fraction"] == pytest.approx(row["achieved"] / row["limit_value"])
        eager = _find_row(bench, row["mode"], "eager", row["batch"], row["seq_len"],
                          row.get("head_positions"))   # timed in this run, the same kind of row
        assert row["vs_eager"] == pytest.approx(eager["p50_ms"] / row["p50_ms"]) and "vs_eager_compile" not in row
        limit = {"compute": lim["compute_by_precision"].get(row["precision"], lim["compute"])["gflops"],
                 "batched": lim["batched_by_precision"][row["precision"]]["gflops"]}.get(row["limit"])
        if row["limit"] == "bandwidth-roofline":
            bw = lim["bandwidth_by_precision"][row["precision"]]["gbps"]
            limit = bw * 1e9 / row["bytes_per_step"]
            assert row["bytes_per_step"] == bench["weight_bytes_per_step"][row["precision"]]
            assert _positive(row["first_ms"]) and _positive(row["last_ms"])
        assert row["limit_value"] == pytest.approx(limit)

    # One fraction recomputed from first principles: prefill FLOPs over the p50 time, over the compute limit.
    row = next(r for r in bench["prefill"] if r["runtime"] == "onnxruntime-cpu" and r["precision"] == "fp32"
               and r["batch"] == 1)
    flops = row["batch"] * row["seq_len"] * bench["flops_per_token"]["total"]
    assert row["flops"] == flops and row["head_positions"] == "all"
    assert row["fraction"] == pytest.approx(flops / (row["p50_ms"] / 1e3) / 1e9 / lim["compute"]["gflops"])
    # Prefill for generation counts the useful FLOPs: every position's blocks, the tied head once (2·V·d).
    gen = _find_row(bench, "prefill", "onnxruntime-cpu", 1, 64, "last")
    per = bench["flops_per_token"]
    cfg_v, cfg_d = bench["config"]["vocab_size"], bench["config"]["d_model"]
    assert gen["flops"] == 64 * (per["total"] - per["head"]) + 2 * cfg_v * cfg_d
    assert gen["head_computed"] == "last" and gen["graph"] == "step"   # the step graph computes no more
    assert _find_row(bench, "prefill", "eager", 1, 64, "last")["head_computed"] == "all"
    row = next(r for r in bench["decode"] if r["runtime"] == "onnxruntime-cpu" and r["precision"] == "fp32"
               and r["batch"] == 1)
    roofline = lim["bandwidth"]["gbps"] * 1e9 / bench["weight_bytes_per_step"]["fp32"]
    assert row["fraction"] == pytest.approx(1e3 / row["p50_ms"] / roofline)

    sc = bench["scaling"]
    assert sc["lengths"] == [32] and sc["d_model"] == 512
    assert {(p["block"], p["mode"]) for p in sc["points"]} == {
        (b, m) for b in ("gam", "transformer") for m in ("forward", "forward+backward")}
    for p in sc["points"]:
        for key in ("p50_ms", "achieved", "flops", "peak_rss_mb"):
            assert _positive(p[key]), (p["block"], p["mode"], key)
    assert sc["summary"]["transformer_over_gam"]

    ce = bench["ceilings"]  # the weight MatMuls alone: what the kernels allow before any graph overhead
    # M: a decode step, a batched (B = 32) decode step, the prefills (64 and 256, capped at the tiny P = 64)
    assert {(r["precision"], r["M"]) for r in ce["rows"]} == {(k, M) for k in ("fp32", "int8") for M in (1, 32, 64)}
    assert {r["limit"] for r in ce["rows"] if r["M"] == 32} == {"batched"}   # as batched decode is scored
    t = {(r["precision"], r["M"]): r["p50_ms"] for r in ce["rows"]}
    assert all(_positive(v) for v in t.values())
    step_bytes = bench["weight_bytes_per_step"]["fp32"]
    assert ce["fp32_decode_fraction"] == pytest.approx(step_bytes / (lim["bandwidth"]["gbps"] * 1e9) * 1e3
                                                       / t[("fp32", 1)])
    assert ce["int8_speedup"] == pytest.approx({str(M): t[("fp32", M)] / t[("int8", M)] for M in (1, 32, 64)})

    # The tiny preset has no 8-head Transformer within ±5 % of its parameters: skipped, with the reason.
    assert bench["training"] is None
    assert any(r.get("section") == "training" and "±5%" in r["reason"] for r in bench["skipped"])

    st = bench["startup"]
    assert _positive(st["help"]["p50_ms"]) and _positive(st["first_token"]["p50_ms"])
    assert st["help"]["command"][-1] == "--help" and "generate" in st["first_token"]["command"]
    # the source is the tiny preset, so the shipped demo model gets its own first-token timing (issue 15's goal)
    demo = st["first_token_demo"]
    assert _positive(demo["p50_ms"]) and "demo" in demo["folder"] and demo["command"] != st["first_token"]["command"]
    # the first token on the folder as gamexport build writes it (the step graph pre-packed here) and, timed in
    # turns with it, on the same graphs without the prepacked copy: the experiment behind the prepacked files
    built = st["build"]   # the source's own gamexport build, its peak memory in a process of its own
    assert built["command"][built["command"].index("build") + 1:][:2] == ["--preset", "tiny"]
    assert 50 < built["peak_rss_mb"] < 8192 and built["wall_s"] > 0
    unpacked = st["first_token_step_onnx"]
    assert _positive(unpacked["p50_ms"]) and unpacked["runs"] == st["first_token"]["runs"]
    assert "pre-packed for this machine" in st["first_token"]["folder"] and "without" in unpacked["folder"]
    built, plain = (Path(cmd[cmd.index("generate") + 1]) for cmd in (st["first_token"]["command"],
                                                                      unpacked["command"]))
    assert built != plain


def test_paired_goals_in_a_quick_run(quick):
    """The goals' paired rounds: each group's items timed once per round, and a goal's value recomputed here from
    the recorded timings and the limits' own kernels (their shapes), independently of gamexport.bench.paired."""
    out, bench, result = quick
    pa = bench["paired"]
    assert pa["rounds"] == 3 and pa["runs_per_block"] == 2
    assert {k: len(v) for k, v in pa["limits_used"].items()} == {
        k: len(bench["limits"][k]["candidates"]) for k in ("compute", "bandwidth", "batched")}
    t = pa["timings_ms"]
    assert set(t) == {"compute", "bandwidth", "batched", "int8 decode", "int8 prefill", "int4 decode"}  # P=64: no
    for group in t.values():                                                           # two disjoint edges of 32
        assert all(len(v) == 3 and all(_positive(x) for x in v) for v in group.values())
    assert {"fp32 prefill B1×64", "fp32 prefill for generation B1×64", "ceiling fp32 M64"} <= set(t["compute"])
    assert {"fp32 decode B1", "int8 decode B1", "int8-dyn decode B1", "ceiling fp32 M1", "ceiling int8 M1"} \
        == set(t["int8 decode"])
    assert "fp32 decode B32" in t["batched"] and "int4 decode B1" in t["int4 decode"]
    # The limits' candidates that are the model's own weight MatMuls are the ceilings' items: timed once a round.
    assert "ceiling fp32 M1" in pa["limits_used"]["bandwidth"] and "ceiling fp32 M32" in pa["limits_used"]["batched"]
    assert not any("weight" in name for group in t.values() for name in group if name.startswith("limit "))
    cands = {f"limit compute: {c['name']}": c for c in bench["limits"]["compute"]["candidates"]}
    used = pa["limits_used"]["compute"]
    assert set(used) == set(cands) and set(used) <= set(t["compute"])     # every candidate, in every round
    goals = {g["id"]: g for g in pa["goals"]}
    per_token = bench["flops_per_token"]["total"]
    for k, key in ((0, "value"), (1, "runner_up")):   # each item's fastest block, and its second fastest
        tc = {n: sorted(v)[k] for n, v in t["compute"].items()}
        limit = max(2 * math.prod(cands[n]["shape"]) / (tc[n] / 1e3) for n in used)
        assert goals["prefill"][key] == pytest.approx(64 * per_token / (tc["fp32 prefill B1×64"] / 1e3) / limit)
        c = {n: sorted(v)[k] for n, v in t["int8 decode"].items()}
        speedup = max(c["fp32 decode B1"] / c[f"{p} decode B1"] for p in ("int8", "int8-dyn"))
        assert goals["int8_decode"][key] == pytest.approx(speedup / (c["ceiling fp32 M1"] / c["ceiling int8 M1"]))
    for g in pa["goals"]:
        assert g["verdict"] in ("", *("met", "not met", "on the line", "bounded"))
        assert bool(g["verdict"]) != bool(g.get("no_verdict"))
    assert goals["decode_flat"]["value"] is None and goals["decode_flat"]["no_verdict"] == "not measured in this run"
    assert "goals, scored in 3 paired rounds" in result.stdout


#: Everything the bench may import from the project (module- or function-level): its own package, the core it
#: measures, the two engines it times and the Transformer baseline. Not the build pipeline: the build imports the
#: limits from gamexport.bench.limits, so a bench importing the build back would be a cycle (issue 13).
BENCH_MAY_IMPORT = ("gamexport.bench", "gamexport.calibration", "gamexport.checkpoint", "gamexport.config",
                    "gamexport.destinations", "gamexport.device", "gamexport.engines.eager", "gamexport.engines.ort",
                    "gamexport.errors", "gamexport.fsutil", "gamexport.graph", "gamexport.jsonfile",
                    "gamexport.layout", "gamexport.limits", "gamexport.machine", "gamexport.manifest", "gamexport.model",
                    "gamexport.sources",
                    "gamexport.targets", "gamexport.training.baselines")


def test_the_bench_imports_no_build_pipeline():
    """Every import in gamexport/bench/ (also those inside functions) is one the bench may make: a new dependency
    on the build pipeline, the CLI or another engine fails here, naming the file and the module."""
    import ast

    import gamexport.bench

    folder = Path(gamexport.bench.__file__).parent
    seen = set()
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                names = [f"gamexport.bench.{node.module}" if node.module else "gamexport.bench"]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module] if node.module != "gamexport" else [
                    f"gamexport.{a.name}" for a in node.names if not a.name.startswith("__")]   # not __version__
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name == "gamexport" or not name.startswith("gamexport"):
                    continue
                seen.add(name)
                assert any(name == ok or name.startswith(ok + ".") for ok in BENCH_MAY_IMPORT), \
                    f"{path.name} imports {name}"
    assert "gamexport.engines.ort" in seen and "gamexport.bench.limits" in seen   # the walk saw the imports


def test_weight_matmul_shapes_are_the_models():
    """The ceilings' graph multiplies by every weight the paper model multiplies by — the memory bank twice (h·Mᵀ
    and softmax·M) — and by nothing else."""
    from gamexport.bench.flops import weight_matmul_shapes

    cfg = GAMConfig()
    shapes = weight_matmul_shapes(cfg)
    assert len(shapes) == 5 * 6 + 1 and shapes[-1] == (512, 10_000)
    per_layer = 2 * 512 * 512 + 512 * 1024 + 512 * 2048 + 2048 * 512
    assert sum(K * N for K, N in shapes) == 6 * per_layer + 512 * 10_000
    # Every parameter but LayerNorms, biases, the conv and the position table, plus a second memory bank.
    others = 6 * (4 * 512 + 1024 + 2048 + 512 + 3 * 512 + 512) + 2 * 512 + 256 * 512
    assert sum(K * N for K, N in shapes) == cfg.n_params() - others + 6 * 512 * 512


def _one(key: str, value: float, name: str = "k") -> dict:
    from gamexport.bench.limits import best_of

    return best_of([{"name": name, key: value, "p50_ms": 1.0}], key)


def test_best_limits_keeps_the_higher_measurement_of_each():
    from gamexport.bench.limits import best_limits, best_of

    def limits(compute, other, bw, batched, int8_bw):
        return {"compute": best_of([{"name": "a", "gflops": compute}, {"name": "b", "gflops": other}], "gflops"),
                "bandwidth": _one("gbps", bw), "batched": _one("gflops", batched),
                "bandwidth_by_precision": {"fp32": {"gbps": bw, "same_as": "bandwidth"},
                                           "int8": _one("gbps", int8_bw)},
                "batched_by_precision": {"fp32": {"gflops": batched, "same_as": "batched"},
                                         "int8": _one("gflops", int8_bw * 2)}}

    best = best_limits(limits(60.0, 50.0, 11.0, 70.0, 40.0), limits(55.0, 65.0, 21.0, 72.0, 30.0))
    assert best["compute"]["gflops"] == 65.0 and best["compute"]["best"] == "b" and best["compute"]["kept"] == "end"
    assert [c["gflops"] for c in best["compute"]["candidates"]] == [60.0, 65.0]   # each candidate's higher one
    assert best["compute"]["candidates"][0]["measured"] == {"start": 60.0, "end": 55.0}
    assert best["bandwidth"]["gbps"] == 21.0 and best["bandwidth"]["measured"] == {"start": 11.0, "end": 21.0}
    assert best["batched"]["gflops"] == 72.0 and best["batched"]["kept"] == "end"
    assert best["bandwidth_by_precision"]["fp32"]["gbps"] == 21.0  # follows the kept bandwidth
    assert best["bandwidth_by_precision"]["int8"]["gbps"] == 40.0
    assert best["batched_by_precision"]["fp32"]["gflops"] == 72.0 and best["batched_by_precision"]["int8"][
        "gflops"] == 80.0


def test_limits_are_the_best_of_their_candidates(monkeypatch):
    """Fake timings: whichever kernel is fastest gives the limit, by name — a graph-input MatMul, torch.mm or a
    streaming read, not always ONNX Runtime's own kernel; without torch its candidates are left out."""
    from gamexport.bench import kernels
    from gamexport.bench.limits import measure_limits
    from gamexport.bench.settings import BATCHED_M, QUICK

    def fake_matmul(M, K, N, threads, effort, constant=True):
        fast = (M, constant) == (2048, False) or (M == BATCHED_M)
        return {"shape": [M, K, N], "engine": "fake", "p50_ms": 1.0 if fast else 4.0}

    class FakeTorch:
        __version__ = "fake"

    monkeypatch.setattr(kernels, "time_matmul", fake_matmul)
    monkeypatch.setattr(kernels, "time_torch_mm", lambda torch, M, K, N, threads, effort: {
        "shape": [M, K, N], "engine": "fake torch", "p50_ms": 0.5 if M == BATCHED_M else 2.0})
    monkeypatch.setattr(kernels, "time_stream", lambda nbytes, threads, effort: {
        "shape": [nbytes // 4], "engine": "fake", "p50_ms": 1e-3})
    monkeypatch.setattr(kernels, "torch_or_none", lambda: FakeTorch)
    cfg = GAMConfig()
    limits = measure_limits(cfg, ("fp32", "int8"), 2, QUICK, lambda msg: None)
    assert limits["compute"]["best"] == "onnxruntime 2048x2048x2048 inputs"
    assert limits["compute"]["gflops"] == pytest.approx(2 * 2048 ** 3 / 1e-3 / 1e9)
    assert len(limits["compute"]["candidates"]) == 4 + 3           # gate, FFN ×2, head; 2048³ ×2, torch.mm
    assert limits["batched"]["best"].startswith("torch.mm 32x")
    assert limits["bandwidth"]["best"].startswith("stream read")
    assert limits["bandwidth_by_precision"]["int8"]["best"].startswith("stream read")
    assert limits["batched_by_precision"]["int8"]["best"].startswith("torch.mm 32x")

    monkeypatch.setattr(kernels, "torch_or_none", lambda: None)  # an edge box without torch
    limits = measure_limits(cfg, ("fp32",), 2, QUICK, lambda msg: None)
    assert not any(c["name"].startswith("torch") for c in limits["compute"]["candidates"])
    assert limits["batched"]["best"].startswith("onnxruntime 32x")


def test_a_row_above_its_limit_marks_the_limit_invalid():
    """A limit lower than what a row achieved is wrong: the check marks it, names the row, and leaves the limits no
    row beats valid — in bench.json's terms and in the build report's summary."""
    from gamexport.bench.limits import (batched_against_limit, check_limits, decode_against_limit, limits_summary,
                                        prefill_against_limit)

    cfg = PRESETS["tiny"]
    limits = {"compute": _one("gflops", 10.0), "bandwidth": _one("gbps", 20.0), "batched": _one("gflops", 30.0),
              "bandwidth_by_precision": {"fp32": {"gbps": 20.0, "same_as": "bandwidth"},
                                         "int8": _one("gbps", 40.0)}}
    flops = 64 * bm_flops(cfg)
    fast = {"runtime": "onnxruntime-cpu", "precision": "int8-dyn", "mode": "prefill", "batch": 1, "seq_len": 64,
            "p50_ms": flops / 11e9 * 1e3}                          # 11 GFLOP/s against a 10 GFLOP/s "limit"
    fast.update(prefill_against_limit(cfg, 1, 64, fast["p50_ms"], limits))
    slow = {"runtime": "onnxruntime-cpu", "precision": "fp32", "mode": "decode", "batch": 1, "seq_len": 1,
            "p50_ms": 1.0}
    slow.update(decode_against_limit(cfg, "fp32", 1000.0, limits))  # 1 token/s: far under the roofline
    invalid = check_limits(limits, [fast, slow])
    assert fast["fraction"] == pytest.approx(1.1)
    assert invalid == [{"limit": "compute", "beaten_by": ["onnxruntime-cpu int8-dyn prefill B1×64"]}]
    assert limits["compute"]["valid"] is False and limits["bandwidth"]["valid"] is True
    assert fast["limit_valid"] is False and fast["limit_beaten_by"] == ["onnxruntime-cpu int8-dyn prefill B1×64"]
    assert slow["limit_valid"] is True and "limit_beaten_by" not in slow
    summary = limits_summary(limits)
    assert summary["valid"] is False and summary["invalid"] == invalid

    # A batched int8 row is measured against the batched limit over the int8 bytes, and beats only that one.
    limits["batched_by_precision"] = {"fp32": {"gflops": 30.0, "same_as": "batched"}, "int8": _one("gflops", 50.0)}
    batched = {"runtime": "onnxruntime-cpu", "precision": "int8", "mode": "decode", "batch": 32, "seq_len": 1}
    batched.update(batched_against_limit(cfg, 32, 32 * bm_flops(cfg) / 40e9 * 1e3, limits, "int8"))
    assert batched["limit_value"] == 50.0 and batched["fraction"] == pytest.approx(0.8)
    batched.update(batched_against_limit(cfg, 32, 32 * bm_flops(cfg) / 60e9 * 1e3, limits, "int8"))
    assert [i["limit"] for i in check_limits(limits, [batched])] == ["batched_by_precision.int8"]
    assert limits["batched"]["valid"]
    del limits["batched_by_precision"]

    # A decode row beating the int8 bandwidth marks that entry only; exactly 1.0 is not beaten.
    int8 = {"runtime": "onnxruntime-cpu", "precision": "int8", "mode": "decode", "batch": 1, "seq_len": 1}
    int8.update(decode_against_limit(cfg, "int8", 1e3 / int8_roofline(cfg, 40.0) / 1.01, limits))
    edge = dict(fast, fraction=1.0)
    invalid = check_limits(limits, [int8, edge])
    assert [i["limit"] for i in invalid] == ["bandwidth_by_precision.int8"] and limits["compute"]["valid"]

    # An INT8 prefill row is measured against its own precision's compute limit (its integer GEMM among the
    # candidates): 11 GFLOP/s beats the fp32 "limit" of 10 but is 0.55 of int8-dyn's 20, and marks nothing.
    limits["compute_by_precision"] = {"fp32": {"gflops": 10.0, "same_as": "compute"}, "int8-dyn": _one("gflops", 20.0)}
    fast.update(prefill_against_limit(cfg, 1, 64, fast["p50_ms"], limits, "int8-dyn"))
    assert fast["limit_value"] == 20.0 and fast["fraction"] == pytest.approx(0.55)
    assert check_limits(limits, [fast]) == [] and fast["limit_valid"] is True
    fast.update(prefill_against_limit(cfg, 1, 64, fast["p50_ms"] / 2, limits, "int8-dyn"))   # 22 GFLOP/s
    assert [i["limit"] for i in check_limits(limits, [fast])] == ["compute_by_precision.int8-dyn"]
    assert limits["compute"]["valid"] and limits_summary(limits)["compute_by_precision_gflops"]["int8-dyn"] == 20.0


def bm_flops(cfg) -> int:
    from gamexport.bench.flops import flops_per_token

    return flops_per_token(cfg)["total"]


def int8_roofline(cfg, gbps: float) -> float:
    from gamexport.bench.flops import weight_bytes_per_step

    return gbps * 1e9 / weight_bytes_per_step(cfg, "int8")


def test_other_processes_cpu(monkeypatch):
    """Other processes' cores = (all busy CPU − this process's own) ÷ wall; the bench marks > 0.2 busy."""
    from gamexport.bench.command import run_load
    from gamexport.machine import cpu_seconds, other_cpu_cores

    assert other_cpu_cores((100.0, 10.0), (130.0, 20.0), 10.0) == 2.0
    assert other_cpu_cores((100.0, 10.0), (105.0, 20.0), 10.0) == 0.0   # never negative
    assert other_cpu_cores(None, (1.0, 1.0), 1.0) is None
    reading = cpu_seconds()
    assert reading is not None and reading[0] > 0 and reading[1] > 0
    assert run_load((0.0, 0.0), (3.0, 0.0), 10.0)["busy"] is True         # 0.3 cores
    assert run_load((0.0, 0.0), (1.0, 0.0), 10.0)["busy"] is False        # 0.1 cores


def test_training_section():
    """GAM and the width-matched Transformer train in fresh processes; tokens/s follows from each step time."""
    from gamexport.bench.settings import QUICK
    from gamexport.bench.training import run_training
    from gamexport.training.baselines import matched_config
    from gamexport.training.presets import TRAIN_PRESETS

    cfg = TRAIN_PRESETS["tiny"].model  # widened so that both baselines match it within ±5 %
    section, skipped = run_training(cfg, 1, QUICK, lambda msg: None)
    assert skipped == []
    assert [r["model"] for r in section["rows"]] == ["gam", "transformer"]
    assert section["T"] == min(256, cfg.max_positions)
    gam, tf = section["rows"]
    for r in section["rows"]:
        assert _positive(r["p50_ms"]) and r["batch"] == section["batch"] and r["T"] == section["T"]
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["T"] / (r["p50_ms"] / 1e3))
    assert gam["parameters"] == cfg.n_params() and gam["d_model"] == cfg.d_model
    assert abs(tf["parameters"] / gam["parameters"] - 1) <= 0.05
    assert tf["d_model"] == matched_config("transformer", cfg).d_model
    assert section["gam_over_transformer"] == pytest.approx(gam["tokens_per_s"] / tf["tokens_per_s"])


def test_plots_and_table(quick):
    out, bench, result = quick
    assert set(bench["plots"]) == {"scaling.png", "fractions.png"}
    for name in bench["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files
    assert "limits: compute" in result.stdout and "onnxruntime-cpu" in result.stdout
    assert "bench.json" in result.stdout
    assert "limits: bandwidth" in result.stderr  # progress goes to stderr


def test_flops_per_token_by_hand():
    """The paper config (V 10000, d 512, L 6, S 512, k 3), counted term by term from the issue's formula."""
    from gamexport.bench.flops import flops_per_token, gam_block_flops, transformer_block_flops

    f = flops_per_token(GAMConfig())
    per_layer = 4 * 512 * 512 + 4 * 512 ** 2 + 16 * 512 ** 2 + 2 * 3 * 512   # 6,294,528
    assert per_layer == 6_294_528
    assert f["head"] == 2 * 10_000 * 512 == 10_240_000
    assert f["total"] == 6 * per_layer + 10_240_000 == 48_007_168
    # The Transformer's FLOP disadvantage at T = 8192 that the issue quotes (2.33×).
    assert transformer_block_flops(8192) / gam_block_flops(8192) == pytest.approx(2.33, abs=0.005)


def test_flops_against_torch_flop_counter():
    """The matmul terms against torch's own count: one GAM block, the whole tiny model, a Transformer block."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gamexport.bench.flops import flops_per_token, gam_block_flops, transformer_block_flops
    from gamexport.bench.points import make_gam_block, make_transformer_block
    from gamexport.model import build_model

    T, d = 8, 512
    x = torch.randn(1, T, d)
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        make_gam_block(d).eval()(x, torch.zeros(1, 2, d))
    assert fc.get_total_flops() == gam_block_flops(T)   # mm (memory read), addmm (gate, FFN), convolution

    cfg = PRESETS["tiny"]
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        build_model(cfg, seed=0).prefill(torch.zeros(1, T, dtype=torch.long))
    assert fc.get_total_flops() == T * flops_per_token(cfg)["total"]   # blocks + the head at every position

    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        make_transformer_block(d).eval()(x)
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    assert counts["aten.addmm"] == 24 * d * d * T   # QKV, output projection, MLP
    # Attention: torch counts QKᵀ and AV over all T keys; the causal count in the formula is half of that.
    q = torch.randn(1, 8, T, d // 8)
    with FlopCounterMode(display=False) as fc:
        torch.softmax(q @ q.transpose(-1, -2), -1) @ q
    assert transformer_block_flops(T, d) - 24 * d * d * T == fc.get_total_flops() // 2


def test_weight_bytes_per_step():
    from gamexport.bench.flops import weight_bytes_per_step

    cfg = GAMConfig()
    fp32 = weight_bytes_per_step(cfg, "fp32")
    assert fp32 == 4 * (22_599_680 - 255 * 512)   # every parameter but the unused position rows
    assert weight_bytes_per_step(cfg, "int8") < weight_bytes_per_step(cfg, "fp16") < fp32


@pytest.mark.parametrize("args,needle", [
    (["--precision", "fp64"], "unknown precision 'fp64'"),
    (["--skip", "everything"], "unknown section 'everything' in --skip"),
    (["--max-t", "64", "--min-t", "128"], "--min-t 128 must be between 1 and --max-t 64"),
    (["--preset", "huge"], "unknown preset 'huge'"),
])
def test_bad_option_is_one_line(tmp_path, args, needle):
    result = invoke("--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change,needle", [
    ({"threads": 0}, "--threads 0 is outside 1.."),
    ({"threads": 2**31}, f"--threads {2**31} is outside 1.."),
    ({"max_t": 16385}, "--max-t 16385 is outside 1..16384"),
])
def test_library_bounds(change, needle):
    """The CLI's typer options refuse these first (bad-input table); the library checks the same bounds."""
    from gamexport.bench.options import BenchOptions, check_options
    from gamexport.errors import InputError

    with pytest.raises(InputError, match=re.escape(needle)):
        check_options(BenchOptions(**change))


def _bench_docs():
    """scripts/bench-docs as a module (it has no .py suffix: it is a command)."""
    import importlib.machinery
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench-docs"
    loader = importlib.machinery.SourceFileLoader("bench_docs", str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("bench_docs", loader))
    loader.exec_module(module)
    return module


def test_docs_tables_are_generated_from_the_committed_json():
    """Every table of docs/benchmarks.md is what scripts/bench-docs makes of the committed JSON: edit the JSON (or
    the script) and regenerate, never the table."""
    bd = _bench_docs()
    doc = bd.DOC.read_text(encoding="utf-8")
    bench = json.loads(bd.BENCH.read_text(encoding="utf-8"))
    gpu = json.loads(bd.GPU.read_text(encoding="utf-8"))
    assert bd.render(doc, bench, gpu, bd.earlier_runs()) == doc, \
        "docs/benchmarks.md differs from its JSON: run scripts/bench-docs"
    assert {m["name"] for m in bd.BLOCK.finditer(doc)} == set(bd.TABLES)
    assert bd.main(["--check"]) == 0

    # A changed number in the JSON changes the page; a row above its limit takes the verdict from its goal.
    drifted = json.loads(json.dumps(bench))
    row = next(r for r in drifted["decode"] if r["runtime"] == "onnxruntime-cpu" and r["precision"] == "fp32"
               and r["batch"] == 1)
    row["fraction"] = 1.5
    assert bd.render(doc, drifted, gpu) != doc
    # A file from before the paired rounds scores issue 15's goals from the sections: an unsteady host takes every
    # such verdict; a steady one leaves the limits' rule.
    drifted.pop("paired", None)
    drifted["steadiness"] = {**drifted["steadiness"], "steady": False, "spread": {"bandwidth": 1.5, "compute": 1.0}}
    goals = bd.table_goals(drifted).split("cold first token")[0]
    assert "✓" not in goals and "✗" not in goals and "host's speed changed" in goals
    drifted["steadiness"] = {**drifted["steadiness"], "steady": True, "spread": {"bandwidth": 1.1, "compute": 1.0}}
    limits, invalid = bd.checked_limits(drifted)
    bandwidth = next(bad for bad in invalid if bad["limit"] == "bandwidth")   # the committed run may name others
    assert not limits["bandwidth"]["valid"] and "onnxruntime-cpu fp32 decode B1×1" in bandwidth["beaten_by"]
    assert "no verdict: the bandwidth limit is invalid" in bd.table_goals(drifted)


def test_docs_tables_from_a_new_bench_json(quick):
    """The script reads the current bench.json too (candidates, validity, load), not only the committed one."""
    bd = _bench_docs()
    out, bench, result = quick
    doc = "".join(f"<!-- bench:table {name} -->\n<!-- /bench:table -->\n" for name in bd.TABLES
                  if not name.startswith("gpu"))
    page = bd.render(doc, bench, None)
    for c in bench["limits"]["compute"]["candidates"]:
        assert c["name"] in page
    assert "other processes' CPU" in page and f"{bench['load']['other_cpu_cores']:.3f} cores" in page
