"""Comparison metrics and the tolerance policy: is a runner's output the reference's output?

Comparison is kept apart from running (as Polygraphy does): runners produce logits, this module judges them.
Metrics, on logits of shape (..., V):

- ``max_abs_diff``: max |test − ref|; passes when ≤ ``max_abs · max(1, max|ref|)``.
- ``max_rel_diff``: max |test − ref| / max|ref| (relative to the largest reference logit, not per element).
- ``cosine``: cosine similarity of the flattened logits.
- ``top1_agreement``: fraction of positions where the argmax agrees, counted only where the reference's
  top-1/top-2 margin is ≥ ``margin`` (a near-tie may flip legitimately); ``top1_counted`` is how many counted.
- ``kl_mean`` / ``kl_max``: KL(ref ‖ test) of the next-token distributions, in nats, over positions.
- ``ppl_ref`` / ``ppl_test`` / ``ppl_rel_change``: perplexity of the true next tokens (only when targets are
  given, i.e. on real text) and |ppl_test / ppl_ref − 1|: the INT8 gate.

A tolerance left as None is not checked. A row whose precision's gate cannot be applied (INT8 without real
text) is reported with ``gated: false``: informational, it does not fail the build.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gamexport.config import last_position
from gamexport.layout import CALIBRATED_PRECISIONS, RUNTIME_SCALED_PRECISIONS

if TYPE_CHECKING:
    from .rows import ParityRow


@dataclass(frozen=True)
class Tolerance:
    max_abs: float | None  # × max(1, max|ref|); None: not gated
    kl: float | None       # mean KL(ref ‖ test) in nats
    top1: float | None     # minimum margin-counted top-1 agreement
    margin: float          # reference top-1/top-2 logit margin below which top-1 is not counted
    reason: str
    ppl_rel: float | None = None  # |ppl_test / ppl_ref − 1| on real text
    #: None: max_abs holds at every position. A quantile q: max_abs holds for the q-quantile over positions of
    #: each position's max |diff| — for references where a value may legitimately round to the neighbouring
    #: quantization step and move a few positions (INT8_PLAN); a bug moves them all.
    abs_quantile: float | None = None
    #: the streaming state's max abs diff × max(1, max|ref state|) when max_abs is None; None: state not gated
    state_abs: float | None = None

    @property
    def needs_targets(self) -> bool:
        return self.ppl_rel is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The one tolerance table (README "Parity" mirrors it), keyed by precision. Each gate is set from the measured noise
#: of its precision (the demo model, ``gamexport build --precision fp32,fp16,bf16,int8,int8-dyn``) and names the
#: mutant of the zoo (tests/zoo.py, docs/guarantees.md "The mutant zoo") it is there to catch.
TOLERANCES: dict[str, Tolerance] = {
    # noise: ONNX Runtime vs eager fp32, summation order only: KL ~2e-12, max |diff| ~4e-5 of logits ~15.
    # Catches every mutant of the zoo at fp32 (the weakest, tanh GELU for exact GELU: KL 5e-6, |diff| 0.08).
    "fp32": Tolerance(max_abs=1e-4, kl=1e-6, top1=1.0, margin=1e-3,
                      reason="same math in fp32: only summation order differs"),
    # noise: KL 2e-7 with fp16 weights and fp32 compute (ONNX Runtime CPU), ~1e-6 where the GPU multiplies in fp16;
    # 1e-5 is 10× the larger. Catches one layer's dropped gate bias (KL 2e-4), one dropped FFN bias (1.7e-3) and
    # LayerNorm ε 1e-3 (7e-4); tanh GELU (5e-6) sits under the noise of a real fp16 GPU: the fp16-weights
    # emulation row (fp32 tolerance, "emulation-fp16-weights") catches it, in the build and in gamexport parity.
    # state noise (ONNX Runtime CPU): 4.2e-4 × max(1, max|state|); 5e-3 is 12×. Catches the step graph returning
    # its input state (0.19 or more on every saved step feed) and positions off by one (0.19 or more).
    "fp16": Tolerance(max_abs=None, kl=1e-5, top1=0.99, margin=0.05, state_abs=5e-3,
                      reason="half-precision weights and matmuls, fp32 LayerNorm/Softmax islands; KL 10× fp16 noise"),
    # noise: KL ~6e-5 where the GPU multiplies in bf16 (bf16 has 8 mantissa bits to fp16's 11); 5e-4 is 8×.
    # Catches one dropped FFN bias (1.7e-3 at fp16, more at bf16) and the structural mutants; a dropped gate bias
    # (2e-4) is below bf16 noise: only the bf16 plan emulation (CUDA) separates it. On a CPU, where no bf16 kernel
    # exists, the bf16 graphs' structural run (bf16 weights upcast to fp32) is gated by emulation-bf16-weights at
    # the fp32 tolerance (measured KL 2.5e-12), which catches every mutant of the zoo at bf16.
    "bf16": Tolerance(max_abs=None, kl=5e-4, top1=0.99, margin=0.05,
                      reason="bfloat16 weights and matmuls, fp32 LayerNorm/Softmax islands; KL 8× bf16 noise"),
    # noise: ppl change 0.35 % (int8) / 0.2 % (int8-dyn) on held-out text, KL vs eager 2.5e-3–4e-3: as large as
    # what a one-layer bug adds, so these are quality gates, not bug detectors. The emulation references
    # (INT8_PLAN, INT8_DYN_PLAN below) catch the small int8 and int8-dyn bugs.
    # state noise: 4.5e-2 (int8) / 6.4e-2 (int8-dyn) × max(1, max|state|); 0.12 is 2× the larger and still under
    # the 0.19 that the step graph returning its input state, or positions off by one, show on every step feed:
    # the state gate that catches those in gamexport parity, whose step feeds have no perplexity.
    "int8": Tolerance(max_abs=None, kl=None, top1=None, margin=0.05, ppl_rel=0.02, state_abs=0.12,
                      reason="static INT8 Q/DQ: perplexity on held-out text within 2 % of fp32"),
    "int8-dyn": Tolerance(max_abs=None, kl=None, top1=None, margin=0.05, ppl_rel=0.02, state_abs=0.12,
                          reason="dynamic INT8 (MatMulInteger): perplexity on held-out text within 2 % of fp32"),
    # noise: ppl change +0.47 % on the demo's held-out text with the default plan (4-bit blocks of 32, the head in
    # 8-bit blocks; a 4-bit head costs +1.8 %, docs/int4.md). A quality gate like INT8's, 3 %: the bugs are caught
    # by the emulation reference (INT4_PLAN below). State noise against eager fp32: up to 0.128 × max(1, max|state|)
    # on the demo's saved feeds (4-bit weights move the normalised inputs the state holds); 0.25 is 2× that, a
    # coarse gate (it caught the zoo's two state mutants at int4; INT4_PLAN's state check, 1e-5, catches them too).
    "int4": Tolerance(max_abs=None, kl=None, top1=None, margin=0.05, ppl_rel=0.03, state_abs=0.25,
                      reason="INT4 weight blocks (MatMulNBits): perplexity on held-out text within 3 % of fp32"),
}

#: An INT8 graph run as written (Q/DQ pairs unfused, ``engines.ort.QDQ_REFERENCE``) against the NumPy
#: fake-quant emulation of the same plan (``gamexport.graph.emulate_int8``): noise is float rounding at a
#: quantization step boundary, measured max |diff| ~1e-5 on logits ~15 (relative 1e-6). The gate (1e-3 relative)
#: catches one per-channel scale tensor 3 % off (the memory banks' read-side scales × 0.97: |diff| 0.7, KL 1e-3)
#: with a 40× margin, and any dropped bias or mis-wired op of the int8 graph.
#: One activation that lies within float rounding of a step boundary rounds the other way in one of the two and
#: moves a few positions after it (measured: 12 of 1024 positions on the held-out text, |diff| up to 0.2), so the
#: abs gate applies to the median position: measured 2.5e-7 × max(1, max|ref|) unmutated, 1.1e-2 (tanh GELU,
#: the weakest mutant) to 8e-1 mutated; the wrong scale (× 0.97) 1.4e-2. KL and top-1, which one flip can move
#: on a short feed, are not gated here (the precision's own gate checks them against eager fp32). The state is
#: gated at every element (measured 1.2e-6; the mutants that reach it move it by 5e-2 or more).
INT8_PLAN = Tolerance(max_abs=1e-3, kl=None, top1=None, margin=0.05, abs_quantile=0.5,
                      reason="must equal the NumPy fake-quant emulation of the INT8 plan (same scales) to rounding, "
                             "at the median position")


#: The int8-dyn graph with exact integer MatMuls (``engines.ort.exact_int8_dynamic_runner``) against the NumPy
#: emulation of ONNX Runtime's dynamic quantization (``gamexport.graph.emulate_int8.int8_dynamic_plan``), both
#: from the same fp32 checkpoint. Noise (demo model, prefill and chunked step, random and held-out text): float
#: rounding moves an activation across a quantization step, and since each call's scale comes from the whole
#: tensor's min/max one such flip can move every position a little: median position 5e-8–5.5e-5
#: × max(1, max|ref|), at most 1.2e-2; state 2.3e-7. The gate, 1e-3 at the median position, is 18× that noise and
#: catches the weakest mutant, tanh GELU for exact GELU (median 7.5e-3, 7×), and one layer's dropped gate bias
#: (9.8e-3), one dropped FFN bias (1.9e-2), LayerNorm ε 1e-3 (1.5e-2) — the bugs that hide under int8-dyn's
#: perplexity noise against eager fp32. The state is gated at every element (mutants: 8.9e-3 or more).
INT8_DYN_PLAN = Tolerance(max_abs=1e-3, kl=None, top1=None, margin=0.05, abs_quantile=0.5,
                          reason="must equal the NumPy emulation of ONNX Runtime's dynamic quantization (same "
                                 "weight scales, run-time activation scales) to rounding, at the median position")


#: An INT4 graph's twin with ``accuracy_level`` 0 (the same 4-bit weights and wiring, fp32 products:
#: ``OrtRunner.plan_runner``) against the float64 emulation of the INT4 plan at level 0
#: (``gamexport.graph.emulate_int4``), from the checkpoint's fp32 weights. Noise (demo model, held-out text):
#: max |diff| 8.4e-7 × max(1, max|ref|). The gate, 1e-5, is 12× that and 7.6× under the weakest planted bug, one
#: 32-value block's scale 3 % off (7.6e-5); a whole tensor's scales 3 % off reach 6.4e-3, a dropped gate bias 4e-3.
#: At level 4 (what ships) ONNX Runtime rounds each block of each MatMul input to int8, a noise (4.8e-3) as large as
#: a one-block bug: the graph as written is judged by the perplexity gate above, its wiring by this twin.
INT4_PLAN = Tolerance(max_abs=1e-5, kl=None, top1=None, margin=0.05, state_abs=None,
                      reason="accuracy-level-0 twin must equal the float64 emulation of the INT4 plan to fp32 "
                             "rounding")


def tolerance(precision: str) -> Tolerance:
    try:
        return TOLERANCES[precision]
    except KeyError:
        raise KeyError(f"no tolerance for precision {precision!r}; known: {sorted(TOLERANCES)}") from None


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean cross-entropy) of ``targets`` (...,) under ``logits`` (..., V)."""
    lp = _log_softmax(np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1]))
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    return float(np.exp(-lp[np.arange(t.size), t].mean()))


def compare_logits(ref: np.ndarray, test: np.ndarray, tol: Tolerance,
                   targets: np.ndarray | None = None,
                   states: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Metrics of ``test`` against ``ref`` (same shape, (..., V)), the tolerances, and ``passed``.

    ``targets`` (same leading shape, the true next token of each position) adds perplexities; a tolerance
    that needs them and gets none makes the row informational (``gated: false``). ``states`` (reference,
    test) adds ``state_max_abs_diff``, gated by the abs tolerance as the ``state`` check.
    """
    ref = np.asarray(ref, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if ref.shape != test.shape:
        return {"passed": False, "error": f"shape {tuple(test.shape)} != reference {tuple(ref.shape)}",
                "tolerances": tol.as_dict()}
    if not np.isfinite(test).all():
        return {"passed": False, "error": "output holds NaN or Inf", "tolerances": tol.as_dict()}
    diff = np.abs(test - ref)
    ref_scale = float(np.abs(ref).max())
    max_abs = float(diff.max())
    cosine = float((ref * test).sum() / (np.linalg.norm(ref) * np.linalg.norm(test) + 1e-300))
    flat_ref = ref.reshape(-1, ref.shape[-1])
    flat_test = test.reshape(-1, test.shape[-1])
    # the two largest of each row (partition: no full sort of every row of a large vocabulary)
    top2 = np.partition(flat_ref, -2, axis=-1)[:, -2:] if flat_ref.shape[-1] > 1 else np.zeros((len(flat_ref), 2))
    counted = (top2[:, 1] - top2[:, 0]) >= tol.margin
    agree = flat_ref.argmax(-1) == flat_test.argmax(-1)
    n_counted = int(counted.sum())
    top1 = float(agree[counted].mean()) if n_counted else 1.0
    lp, lq = _log_softmax(flat_ref), _log_softmax(flat_test)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    kl_mean, kl_max = float(kl.mean()), float(kl.max())
    abs_limit = None if tol.max_abs is None else tol.max_abs * max(1.0, ref_scale)
    checks = {}
    if tol.kl is not None:
        checks["kl"] = kl_mean <= tol.kl
    if tol.top1 is not None:
        checks["top1"] = top1 >= tol.top1
    over = {}
    if abs_limit is not None and tol.abs_quantile is None:
        checks["max_abs"] = max_abs <= abs_limit
    elif abs_limit is not None:
        quantile = float(np.quantile(diff.reshape(-1, diff.shape[-1]).max(-1), tol.abs_quantile))
        over = {"abs_diff_quantile": quantile,
                "positions_over_abs_limit": int((diff.reshape(-1, diff.shape[-1]).max(-1) > abs_limit).sum())}
        checks["max_abs"] = quantile <= abs_limit
    ppl = {}
    if targets is not None:
        ppl_ref, ppl_test = perplexity(ref, targets), perplexity(test, targets)
        ppl = {"ppl_ref": ppl_ref, "ppl_test": ppl_test, "ppl_rel_change": abs(ppl_test / ppl_ref - 1.0)}
        if tol.ppl_rel is not None:
            checks["ppl_rel"] = ppl["ppl_rel_change"] <= tol.ppl_rel
    state = {}
    if states is not None:
        state_diff, checks["state"] = compare_state(states[0], states[1], tol)
        state = {"state_max_abs_diff": state_diff}
    gated = not (tol.needs_targets and targets is None) or "state" in checks  # a state gate applies without text
    return {
        **ppl,
        **state,
        **over,
        "gated": gated,
        "max_abs_diff": max_abs,
        "max_abs_limit": abs_limit,
        "max_rel_diff": max_abs / ref_scale if ref_scale else max_abs,
        "cosine": cosine,
        "top1_agreement": top1,
        "top1_counted": n_counted,
        "positions": int(flat_ref.shape[0]),
        "kl_mean": kl_mean,
        "kl_max": kl_max,
        "tolerances": tol.as_dict(),
        "failed_checks": sorted(k for k, ok in checks.items() if not ok),
        "passed": all(checks.values()) if gated else True,
    }


def compare_state(ref: np.ndarray, test: np.ndarray, tol: Tolerance) -> tuple[float, bool]:
    """Max abs difference of two streaming states and whether it is within the logits' abs tolerance."""
    ref = np.asarray(ref, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if ref.shape != test.shape or not np.isfinite(test).all():
        return float("inf"), False
    diff = float(np.abs(ref - test).max())
    limit = tol.max_abs if tol.max_abs is not None else tol.state_abs
    if limit is None:
        return diff, True
    return diff, diff <= limit * max(1.0, float(np.abs(ref).max()))


# ---- inputs -------------------------------------------------------------------------------------------------
def parity_inputs(vocab: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token sequences (1, length) that stress different things: random ids, repeats, an n-gram pattern."""
    rng = np.random.default_rng(seed)
    random = rng.integers(0, vocab, size=(1, length), dtype=np.int64)
    repeat = np.full((1, length), int(rng.integers(0, vocab)), dtype=np.int64)
    gram = rng.integers(0, vocab, size=5, dtype=np.int64)
    ngram = np.resize(gram, (1, length)).astype(np.int64)
    return {"random": random, "repeat": repeat, "ngram": ngram}


def chunk_plan(length: int, kernel_size: int) -> list[int]:
    """Chunk sizes that cover ``length`` tokens and cross the conv window in awkward places (1, k-1, k, …)."""
    sizes, pos = [], 0
    pattern = [1, 1, max(1, kernel_size - 1), kernel_size, 5, 2, 13]
    i = 0
    while pos < length:
        size = min(pattern[i % len(pattern)], length - pos)
        sizes.append(size)
        pos += size
        i += 1
    return sizes


def chunk_ends(sizes: list[int]) -> np.ndarray:
    """The position of each chunk's last token: where a step graph returns logits (its last position only)."""
    return np.cumsum(sizes) - 1


def run_chunks(runner, ids: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Feed ``ids`` through ``runner.step`` in chunks of ``sizes`` from the zero state: the logits of every
    chunk's last position (B, len(sizes), V), at :func:`chunk_ends`, and the final state.

    A step graph returns only those (what generation samples from); a runner that returns every position of a
    chunk (eager PyTorch) is read at the same positions, so every step row compares like with like. Positions
    inside a chunk still reach the comparison: through the chunk's last position (the conv reads the two before
    it) and the state."""
    state = runner.empty_state(ids.shape[0])
    pos, outs = 0, []
    for size in sizes:
        logits, state = runner.step(ids[:, pos:pos + size], np.full((ids.shape[0], 1), pos, np.int64), state)
        outs.append(last_position(logits))
        pos += size
    return np.concatenate(outs, axis=1), state


def chunked_targets(ids: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """For a perplexity over chunked step logits: the chunk ends that have a next token, and those tokens."""
    ends = chunk_ends(sizes)
    ends = ends[ends < ids.shape[1] - 1]
    return ends, ids[:, ends + 1]


# ---- the verdict of a set of rows -------------------------------------------------------------------------------
#: The input label of rows scored on the text the INT8 graphs were calibrated on (too little held-out text to
#: split): such rows are informational, never a gate.
CALIBRATION_TEXT = "calibration-text"
#: Precisions calibrated on the held-out text (static INT8; dynamic INT8 measures its scales at run time).
CALIBRATED = CALIBRATED_PRECISIONS
CALIBRATION_NOTE = ("scored on its own calibration text (the held-out text gave fewer than 2 rows): "
                    "not a held-out gate")


def mark_calibration_scored(row: ParityRow) -> ParityRow:
    """A row of a calibrated precision (INT8) on text that was also its calibration text: informational,
    labelled ``calibration-text``, and its note says why. Other rows are returned unchanged."""
    if row.input in ("text", CALIBRATION_TEXT) and row.precision in CALIBRATED \
            and CALIBRATION_NOTE not in (row.note or ""):
        row.informational(CALIBRATION_NOTE, input_name=CALIBRATION_TEXT)
    return row


@dataclass(frozen=True)
class Verdict:
    """What a set of parity rows says, counted in one place for the build, ``gamexport parity`` and the report.

    A row is *gated* unless it says ``gated: false``; an informational row is measured and reported but never
    counted as passed (nor failed). ``passed`` needs at least one gated row and no failing one: a run that checked
    nothing has not passed. ``ungated`` names the precisions that were asked for but have no gated row (every row
    informational, or not run here), with why.
    """

    gated_passed: int
    gated_failed: int
    informational: int
    ungated: tuple[tuple[str, str], ...] = ()

    @property
    def gated(self) -> int:
        return self.gated_passed + self.gated_failed

    @property
    def passed(self) -> bool:
        return self.gated > 0 and self.gated_failed == 0

    def headline(self) -> str:
        """``12 gated passed, 4 informational`` or ``2 of 14 gated failed, 4 informational``."""
        head = (f"{self.gated_failed} of {self.gated} gated failed" if self.gated_failed
                else f"{self.gated_passed} gated passed")
        tail = f"; no gated check of {', '.join(p for p, _ in self.ungated)}" if self.ungated else ""
        return f"{head}, {self.informational} informational{tail}"

    @classmethod
    def from_counts(cls, counts: dict[str, Any]) -> Verdict:
        """The verdict a report's ``parity_counts`` holds."""
        return cls(counts["gated_passed"], counts["gated_failed"], counts["informational"],
                   tuple((u["precision"], u["reason"]) for u in counts.get("ungated", ())))

    def counts(self) -> dict[str, Any]:
        """For report.json (``parity_counts``)."""
        return {"gated_passed": self.gated_passed, "gated_failed": self.gated_failed,
                "informational": self.informational,
                "ungated": [{"precision": p, "reason": why} for p, why in self.ungated]}

    def nothing_checked(self) -> str:
        """Why no row was gated, for the one error line of a run that checked nothing."""
        whys = [f"{p}: {why}" for p, why in self.ungated]
        if self.informational:
            whys.append(f"every one of the {self.informational} rows is informational")
        return "nothing was checked: " + ("; ".join(whys) or "no parity row was produced")


def informational_reason(row: dict) -> str:
    """Why a row with ``gated: false`` is not a gate, in a few words (report.md and error lines)."""
    if row.get("input") == CALIBRATION_TEXT:
        return "scored on its own calibration text"
    if row.get("chunks") and row.get("precision") in RUNTIME_SCALED_PRECISIONS:
        return f"{row['precision']} chunks quantized with their own run-time scales, too few tokens to gate"
    if str(row.get("reference", "")).startswith("emulation-"):
        return "plan and fp32 compute indistinguishable on these inputs"
    if (row.get("tolerances") or {}).get("ppl_rel") is not None:
        if row.get("input") == "text":
            return "too short a feed for the perplexity gate; the chunked text row gates this graph"
        return "gate needs held-out text"
    return "not gated"


def verdict(rows: list[dict], skipped: list[dict] = (), precisions: tuple[str, ...] = ()) -> Verdict:
    """Count ``rows`` (parity rows) into a :class:`Verdict`.

    ``precisions`` are the precisions asked for; each one with no gated row is named in ``ungated`` with why:
    the reason of its ``skipped`` row (not run here), or the reason its rows are informational.
    """
    gated = [r for r in rows if r.get("gated", True)]
    failed = sum(not r["passed"] for r in gated)
    ungated = []
    for p in dict.fromkeys(precisions):
        if any(r["precision"] == p for r in gated):
            continue
        mine = [r for r in rows if r["precision"] == p]
        skip = next((s for s in skipped if s.get("precision") == p), None)
        if mine:
            why = "informational only (" + ", ".join(dict.fromkeys(informational_reason(r) for r in mine)) + ")"
        elif skip is not None:
            why = f"not run on {skip['runtime']} ({skip['reason'].split(';')[0]})"
        else:
            why = "not run"
        ungated.append((p, why))
    return Verdict(gated_passed=len(gated) - failed, gated_failed=failed, informational=len(rows) - len(gated),
                   ungated=tuple(ungated))
