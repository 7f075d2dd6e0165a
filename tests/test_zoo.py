"""The mutant zoo (tests/zoo.py): every plausible exporter bug, planted into the built graphs of every precision it
applies to, is caught by the build's parity rows and by ``gamexport parity DIR`` — and the unmutated build passes.

One demo build (the trained 1M-parameter model: on an untrained model the logits are nearly flat and no gate means
anything) serves every case; each case plants one mutant into a copy of it. docs/guarantees.md "The mutant zoo"
has the table mutant × precision → the row that catches it. bf16 is not here: no CPU runs bf16 graphs.
"""

from __future__ import annotations

import shutil

import pytest

import zoo

PRECISIONS = ("fp32", "fp16", "int8", "int8-dyn")

#: (mutant, precision) → the judges that do not catch it yet ("build", "parity"), asserted exactly, so a fix
#: must update this table and docs/guarantees.md. int8-dyn has no plan emulation (ONNX Runtime's quantizer
#: chooses its activation scales at run time), and its noise against eager fp32 (ppl 0.2 %, KL 1e-3–2e-3) is as
#: large as what these one-layer bugs add. The build's state gate sees the dropped gate bias on its 256-token
#: inputs (state diff just above 0.12 × max|state|, a thin margin); gamexport parity's 32-token feeds do not.
KNOWN_ESCAPES = {
    ("gate_bias_dropped_one_layer", "int8-dyn"): {"parity"},
    ("ffn_bias_dropped_one", "int8-dyn"): {"build", "parity"},
    ("tanh_gelu", "int8-dyn"): {"build", "parity"},
    ("layernorm_eps", "int8-dyn"): {"build", "parity"},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(build folder, checkpoint, eager runner, held-out text ids, evaluation ids) of one demo build."""
    from gamexport.engines.eager import EagerRunner
    from gamexport.engines.pipeline import (BuildOptions, build, held_out_ids, resolve_source,
                                            split_calibration)

    out = tmp_path_factory.mktemp("zoo") / "demo"
    result = build(BuildOptions(out=out, precisions=PRECISIONS, latency=False, threads=1))
    assert result.passed, "the unmutated demo build must pass all its gated rows"
    ckpt = resolve_source(None, None)
    text = held_out_ids(ckpt)
    _, eval_ids = split_calibration(text, ckpt.config)
    return out, ckpt, EagerRunner(ckpt.config, ckpt.weights, threads=1), text, eval_ids


def test_unmutated_build_passes_its_gated_rows_and_the_recheck(demo):
    folder, *_ = demo
    for precision in PRECISIONS:
        rows = zoo.recheck_rows(folder, precision)
        assert rows and not zoo.caught_by(rows), (precision, zoo.caught_by(rows))
        if precision in ("fp16", "int8"):  # the emulation references are re-checked too
            assert {r["reference"] for r in rows} >= {"eager-fp32", f"emulation-{precision}" +
                                                       ("-weights" if precision == "fp16" else "")}


CASES = [(m, p) for p in PRECISIONS for m in zoo.MUTANTS if zoo.applies(m, p)]


@pytest.mark.slow
@pytest.mark.parametrize("mutant,precision", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_mutant_is_caught_by_the_build_and_by_gamexport_parity(demo, tmp_path, mutant, precision):
    folder, ckpt, eager, text, eval_ids = demo
    copy = tmp_path / "mutant"
    shutil.copytree(folder, copy)
    changed = zoo.plant(copy, mutant, precision)
    assert changed, "the mutant changed no file"
    by_build = zoo.caught_by(zoo.build_rows(ckpt, eager, copy, precision, text, eval_ids))
    by_recheck = zoo.caught_by(zoo.recheck_rows(copy, precision))
    escaped = {judge for judge, caught in (("build", by_build), ("parity", by_recheck)) if not caught}
    assert escaped == KNOWN_ESCAPES.get((mutant, precision), set()), \
        f"{mutant} at {precision} escapes {sorted(escaped) or 'nothing'}: update KNOWN_ESCAPES and the docs"
    if escaped:
        pytest.xfail(f"known escape: {mutant} at {precision} escapes {', '.join(sorted(escaped))}")
