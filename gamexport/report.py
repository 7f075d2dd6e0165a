"""The build report: ``report.json`` (versioned, validated by ``report.schema.json``) and ``report.md``.

Row keys: ``runtime`` ∈ RUNTIMES, ``precision`` ∈ PRECISIONS, ``graph`` ∈ {prefill, step}, ``batch``,
``seq_len``. Parity rows carry the metrics of ``gamexport.parity`` with their tolerances and ``passed``;
latency rows carry p50/p90/p99 ms and tokens/s; skipped rows say why something was not run. The rows are built as
``gamexport.parity.rows`` types; this module assembles the reports from them and holds the one formatter of rows
(report.md, and the lines ``gamexport build`` and ``gamexport parity`` print).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from gamexport.config import FORMAT_VERSION, past_state_name, present_state_name

if TYPE_CHECKING:
    from gamexport.parity.rows import ParityRow

#: The build folder's format (``gamexport.config.FORMAT_VERSION``): 2 = per-layer state I/O.
SCHEMA_VERSION = FORMAT_VERSION


def schema() -> dict:
    """The JSON Schema of report.json (shipped beside this module)."""
    return json.loads(resources.files("gamexport").joinpath("report.schema.json").read_text(encoding="utf-8"))


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


# ---- the reports, built from typed rows --------------------------------------------------------------------
def build_report(ckpt, trained: bool, counted, machine: dict, artifacts: list[str], graph_checks: list[dict],
                 parity: Sequence[ParityRow], latency: list[dict], skipped: list[dict],
                 graph_sizes: dict[str, dict] | None = None) -> dict:
    """``report.json`` of a build: the source and model, the machine, what was written and checked, and the rows.

    ``counted`` is the :class:`~gamexport.parity.metrics.Verdict` of ``parity``; ``latency`` holds the latency
    rows as dicts (``LatencyRow.to_dict()``, with the machine's limits added)."""
    from gamexport import __version__

    cfg = ckpt.config
    return {
        "schema_version": SCHEMA_VERSION, "gamexport_version": __version__, "passed": counted.passed,
        "parity_counts": counted.counts(),
        "source": {"path": ckpt.source, "sha256": ckpt.sha256, "trained": trained,
                   "label": str(ckpt.meta.get("label", ""))},
        "config": cfg.to_dict(), "parameters": cfg.n_params(), "receptive_field": cfg.receptive_field,
        "state_floats": cfg.n_layers * cfg.state_len * cfg.d_model,
        "state_io": {"inputs": past_state_name("{i}"), "outputs": present_state_name("{i}"),
                     "shape": ["batch", cfg.state_len, cfg.d_model], "layers": cfg.n_layers},
        "machine": machine, "artifacts": artifacts, "graph_checks": graph_checks,
        "parity": [row.to_dict() for row in parity], "latency": latency, "skipped": skipped,
        **({"graph_sizes": graph_sizes} if graph_sizes else {}),
    }


def graph_sizes(folder: Path, precisions: Sequence[str]) -> dict[str, dict]:
    """{precision: bytes of its prefill and step graphs (.onnx, with functions) and their sum over fp32's}."""
    from gamexport.layout import graph_file

    sizes = {}
    for p in precisions:
        files = [Path(folder) / graph_file(kind, p) for kind in ("prefill", "step")]
        if all(f.is_file() for f in files):
            sizes[p] = {"prefill_bytes": files[0].stat().st_size, "step_bytes": files[1].stat().st_size}
    if "fp32" in sizes:
        base = sizes["fp32"]["prefill_bytes"] + sizes["fp32"]["step_bytes"]
        for entry in sizes.values():
            entry["vs_fp32"] = (entry["prefill_bytes"] + entry["step_bytes"]) / base
    return sizes


def recheck_report(folder: Path, parity: Sequence[ParityRow], skipped: list[dict], precisions: tuple[str, ...],
                   threads: int | None, genai: list[dict] = ()) -> dict:
    """The report of ``gamexport parity DIR`` (``--report``): the verdict of ``parity`` and of the onnxruntime-genai
    bundles run (``genai``, as in a build's report.json) over ``precisions``."""
    from gamexport.machine import machine_info
    from gamexport.parity import verdict

    report = {"schema_version": SCHEMA_VERSION, "folder": str(folder), "parity": [row.to_dict() for row in parity],
              "genai": list(genai), "skipped": skipped}
    counted = verdict(checked_rows(report), skipped, precisions)
    return {**report, "passed": counted.passed, "parity_counts": counted.counts(), "machine": machine_info(threads)}


# ---- the one formatter of parity and latency rows (report.md, gamexport build, gamexport parity) -------------
def parity_mark(row: dict) -> str:
    """``pass``, ``FAIL`` or ``info`` (an informational row: measured, never counted as passed or failed)."""
    if not row.get("gated", True):
        return "info"
    return "pass" if row["passed"] else "FAIL"


def _result(row: dict) -> str:
    """The result cell of report.md: the mark, with why a row is informational or which checks failed."""
    mark = parity_mark(row)
    if mark == "info":
        from gamexport.parity import informational_reason

        return f"info ({informational_reason(row)})"
    return mark if mark == "pass" else "FAIL " + ", ".join(row.get("failed_checks", []))


def _headline(report: dict) -> str:
    """``12 gated passed, 4 informational``: counted by the one verdict function (informational rows never pass)."""
    from gamexport.parity import Verdict, verdict

    counts = report.get("parity_counts")
    return (Verdict.from_counts(counts) if counts else verdict(checked_rows(report))).headline()


def checked_rows(report: dict) -> list[dict]:
    """What a report's verdict counts: its parity rows and the onnxruntime-genai bundles it ran (``genai``)."""
    return report["parity"] + [g for g in report.get("genai", ()) if "skipped" not in g]


def parity_line(row: dict) -> str:
    """One parity row as ``gamexport parity`` prints it."""
    extra = f"ppl change {row['ppl_rel_change']:.4f}" if "ppl_rel_change" in row else \
        f"max abs {row['max_abs_diff']:.3g}, KL {row['kl_mean']:.3g}"
    return (f"{parity_mark(row):4}  {row['runtime']} {row['precision']:<8} {row['graph']:<7} {row['input']:<6} "
            f"B{row['batch']}×{row['seq_len']}: {extra}")


def genai_line(entry: dict) -> str:
    """One onnxruntime-genai bundle as ``gamexport parity`` prints it: its mark and the greedy agreement, or why it
    was skipped."""
    if "skipped" in entry:
        return f"skip  onnxruntime-genai {entry['precision']:<8} {entry['bundle']}/: {entry['skipped']}"
    return (f"{parity_mark(entry):4}  onnxruntime-genai {entry['precision']:<8} {entry['bundle']}/ greedy on "
            f"'{entry['input']}': {entry['rows_equal']} of {entry['prompts']} prompts token-exact")


def latency_line(row: dict) -> str:
    """One latency row as ``gamexport build`` prints it."""
    return (f"latency: {row['runtime'] + ' ' + row['precision']:<21} {row['mode']:<7} B{row['batch']}×{row['seq_len']:<4} "
            f"p50 {row['p50_ms']:8.3f} ms {row['tokens_per_s']:10.1f} tokens/s "
            f"({row['speedup_vs_eager']:.2f}× eager)" + ("  [noisy]" if row["noisy"] else ""))


def parity_failure(rows: list[dict]) -> str:
    """What failed, for the one error line of a failed build or ``gamexport parity``: how many checks, and the
    first failing row (runtime, precision, graph, input) with its failed metrics and where it diverged."""
    gated = [r for r in rows if r.get("gated", True)]
    bad = [r for r in gated if not r["passed"]]
    first = bad[0]
    where = next((r["divergence"]["summary"] for r in bad if "summary" in r.get("divergence", {})), None)
    if "rows_equal" in first:   # an onnxruntime-genai bundle's greedy decode (report.json's genai)
        what = (f"{first['runtime']} {first['precision']} {first['bundle']}/ greedy on '{first['input']}': "
                f"{first['rows_equal']} of {first['prompts']} prompts token-exact")
    else:
        what = (f"{first['runtime']} {first['precision']} {first['graph']} on '{first['input']}': "
                f"{', '.join(first.get('failed_checks', [])) or first.get('error', 'see the report')}")
    return (f"{len(bad)} of {len(gated)} gated parity checks failed (first: {what}"
            + (f"; {where}" if where else "") + ")")


def _state_io(report: dict) -> str:
    io = report.get("state_io")
    return f", carried per layer as `{io['inputs']}` → `{io['outputs']}`" if io else ""


def _genai_lines(genai: list[dict] | None) -> list[str]:
    """The onnxruntime-genai section: each bundle through og.Generator against gamexport's greedy decode."""
    if not genai:
        return []
    lines = ["", "## onnxruntime-genai", ""]
    for g in genai:
        if "skipped" in g:
            lines.append(f"- `{g['bundle']}/`: not run — {g['skipped']}")
            continue
        where = g.get("first_mismatch")
        verdict = ("token-exact" if g["passed"] else
                   f"DIFFERS (first at row {where['row']}, new token {where['new_token']})")
        lines.append(f"- `{g['bundle']}/` through {g['client']} `og.Generator` greedy vs {g['reference']}: "
                     f"{g['rows_equal']}/{g['prompts']} {g['input']} prompts equal, {g['tokens_compared']} tokens, "
                     f"batch {g['batch']} — {verdict}" + ("" if g.get("gated", True) else
                                                           f" (informational: {g.get('note', '')})"))
    return lines


def render_markdown(report: dict) -> str:
    """A report a person can read: what was built, whether it matches eager, and how fast it runs."""
    src = report["source"]
    cfg = report["config"]
    lines = [
        "# gamexport build report",
        "",
        f"- **Result:** {'PASSED' if report['passed'] else 'FAILED'} — parity: {_headline(report)}",
        f"- **Source:** `{src['path']}` (sha256 `{src['sha256'][:16]}…`)"
        + ("" if src.get("trained") else " — **untrained seeded weights**: parity is exact math, "
           "but generated text is noise"),
        f"- **Model:** GAM, vocab {cfg['vocab_size']}, d {cfg['d_model']}, {cfg['n_layers']} layers, "
        f"{cfg['n_slots']} memory slots, kernel {cfg['kernel_size']}, {cfg['max_positions']} positions — "
        f"{report['parameters']:,} parameters",
        f"- **Streaming:** receptive field {report['receptive_field']} tokens; state per sequence "
        f"{report['state_floats']:,} floats (no KV cache)" + _state_io(report),
        f"- **Machine:** {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['threads']} threads",
        "",
        "## Parity",
        "",
        "Each row compares a runtime's logits with a reference on the same tokens. `max abs` passes when "
        "≤ limit = tol·max(1, max|ref|); top-1 counts only positions whose reference top-1/top-2 margin ≥ δ; "
        "KL is the mean KL(ref‖test) of next-token distributions in nats.",
        "",
        "| runtime | graph | artifact | vs | input | B×T | max abs (limit) | cosine | top-1 (counted) "
        "| KL mean (limit) | ppl change (limit) | state max abs | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["parity"]:
        tol = r["tolerances"]
        lines.append(
            f"| {r['runtime']} {r['precision']} | {r['graph']} | {r['artifact']} | {r['reference']} | {r['input']} "
            f"| {r['batch']}×{r['seq_len']} | {_fmt(r.get('max_abs_diff'))} ({_fmt(r.get('max_abs_limit'))}) "
            f"| {_fmt(r.get('cosine'), '.9f')} | {_fmt(r.get('top1_agreement'))} ({_fmt(r.get('top1_counted'))}) "
            f"| {_fmt(r.get('kl_mean'))} ({_fmt(tol['kl'])}) "
            f"| {_fmt(r.get('ppl_rel_change'))} ({_fmt(tol.get('ppl_rel'))}) | {_fmt(r.get('state_max_abs_diff'))} "
            f"| {_result(r)} |")
    lines += [
        "",
        "## Latency",
        "",
        f"Measured in this run on {report['machine']['threads']} threads; a benchmark, not a test. "
        "`noisy` marks runs whose (p90−p10)/p50 exceeds 0.3.",
        "",
        "| runtime | precision | mode | B×T | p50 ms | p90 ms | p99 ms | tokens/s | vs eager | of limit | runs | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["latency"]:
        of_limit = (f"{r['fraction']:.2f} of {'compute' if r['limit'] == 'compute' else 'roofline'}"
                    if "fraction" in r else "")
        if r.get("limit_valid") is False:
            of_limit += f" (limit invalid: beaten by {', '.join(r.get('limit_beaten_by', []))})"
        lines.append(
            f"| {r['runtime']} | {r['precision']} | {r['mode']} | {r['batch']}×{r['seq_len']} | {r['p50_ms']:.3f} "
            f"| {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['tokens_per_s']:.1f} "
            f"| {_fmt(r.get('speedup_vs_eager'), '.2f')}× | {of_limit} | {r['runs']} | {'noisy' if r['noisy'] else ''} |")
    limits = report["machine"].get("limits")
    if limits:
        lines += ["", f"Limits measured in this run ({limits['definition']}): compute "
                  f"{limits['compute_gflops']:.1f} GFLOP/s, bandwidth {limits['bandwidth_gbps']:.1f} GB/s, batched "
                  f"{limits['batched_gflops']:.1f} GFLOP/s. Prefill counts the head at every position."]
        lines += [f"**Limit invalid: {bad['limit']} beaten by {', '.join(bad['beaten_by'])}** — a fraction above 1.0 "
                  "means the measured limit is too low, not the row fast." for bad in limits.get("invalid", [])]
    for r in report["parity"]:
        d = r.get("divergence") or {}
        if "block_rel_errors" in d:
            lines += ["", f"**{r['runtime']} {r['precision']} {r['graph']} on '{r['input']}' failed** — {d['summary']}. "
                      "Relative error of the residual stream after each block: "
                      + ", ".join(f"blocks.{i} {e:.2%}" for i, e in enumerate(d["block_rel_errors"])) + "."]
    notes = sorted({r["note"] for r in report["parity"] if r.get("note")})
    if notes:
        lines += ["", "Precision labels: " + "; ".join(notes) + "."]
    if report.get("graph_checks"):
        lines += ["", "## Graph checks", "", "| artifact | precision | checks | result |", "|---|---|---|---|"]
        lines += [f"| {g['artifact']} | {g['precision']} | {', '.join(g['checks'])} | "
                  f"{'pass' if g['passed'] else 'FAIL'} |" for g in report["graph_checks"]]
    if report["skipped"]:
        lines += ["", "## Not run", ""]
        lines += [f"- {r['runtime']} {r.get('precision', '')}: {r['reason']}" for r in report["skipped"]]
    if report.get("graph_sizes"):
        lines += ["", "## Graph sizes", "", "| precision | prefill graph | step graph | vs fp32 |", "|---|---|---|---|"]
        lines += [f"| {p} | {s['prefill_bytes']:,} B | {s['step_bytes']:,} B | "
                  f"{_fmt(s.get('vs_fp32'), '.3f')}× |" for p, s in report["graph_sizes"].items()]
    lines += _genai_lines(report.get("genai"))
    lines += ["", "## Files", "", "See `manifest.json` for sizes and sha256 of every file.", ""]
    return "\n".join(lines)
