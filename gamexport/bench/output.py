"""What a bench run leaves: ``bench.json``'s file names, the plots (``scaling.png``, ``fractions.png``) and the
table ``gamexport bench`` prints."""

from __future__ import annotations

from pathlib import Path

from gamexport.bench.limits import shape_label


SCHEMA_VERSION = 1
BENCH_FILE = "bench.json"
SCALING_PLOT = "scaling.png"
FRACTIONS_PLOT = "fractions.png"


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def write_plots(result: dict, out: Path) -> list[str]:
    """``scaling.png`` (time vs T, log-log, both blocks) and ``fractions.png`` (fraction of the limit per runtime
    and precision); [] when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from gamexport.fsutil import atomic_write_bytes

    written = []
    scaling = result.get("scaling")
    if scaling and scaling["points"]:
        fig = _scaling_figure(plt, matplotlib, scaling, result["threads"])
        atomic_write_bytes(out / SCALING_PLOT, _png(fig))
        plt.close(fig)
        written.append(SCALING_PLOT)
    rows = [*result["prefill"], *result["decode"]]
    if rows:
        fig = _fractions_figure(plt, rows, result["threads"])
        atomic_write_bytes(out / FRACTIONS_PLOT, _png(fig))
        plt.close(fig)
        written.append(FRACTIONS_PLOT)
    return written


def _scaling_figure(plt, matplotlib, scaling: dict, threads: int):
    """Time vs T of both blocks, forward and forward+backward side by side, with a linear-cost guide."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, mode in zip(axes, ("forward", "forward+backward")):
        for block, color in (("gam", "#2a7ab9"), ("transformer", "#d9822b")):
            pts = sorted((p["T"], p["p50_ms"]) for p in scaling["points"]
                         if p["block"] == block and p["mode"] == mode)
            if pts:
                ax.plot([t for t, _ in pts], [ms for _, ms in pts], "o-", color=color,
                        label="GAM block" if block == "gam" else "Transformer block")
        gam = sorted((p["T"], p["p50_ms"]) for p in scaling["points"] if p["block"] == "gam" and p["mode"] == mode)
        if len(gam) > 1:  # a linear-cost guide through GAM's first point
            ax.plot([gam[0][0], gam[-1][0]], [gam[0][1], gam[0][1] * gam[-1][0] / gam[0][0]], ":",
                    color="#888888", label="linear in T")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({p["T"] for p in scaling["points"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("p50 ms")
        ax.set_title(f"{mode}, d {scaling['d_model']}, B 1")
        ax.legend(fontsize=8)
    fig.suptitle(f"one block, {threads} threads, torch")
    fig.tight_layout()
    return fig


def _fractions_figure(plt, rows: list[dict], threads: int):
    """One bar chart per kind of row (prefill shape, decode batch): each runtime and precision's fraction."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = (f"prefill {shape_label(r)} (compute)" if r["mode"] == "prefill" else
               f"decode B{r['batch']} ({'bandwidth roofline' if r['batch'] == 1 else 'M=32 MatMul'})")
        groups.setdefault(key, []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 0.45 * max(
        len(g) for g in groups.values()) + 1.6), sharey=True, squeeze=False)
    for ax, (title, group) in zip(axes[0], groups.items()):
        names = [f"{r['runtime']} {r['precision']}" for r in group]
        values = [r["fraction"] for r in group]
        colors = ["#cc4444" if r.get("noisy") else "#2a7ab9" for r in group]
        ax.barh(range(len(group)), values, color=colors)
        ax.set_yticks(range(len(group)), names, fontsize=8)
        ax.axvline(1.0, color="#444444", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("fraction of limit")
    axes[0][0].invert_yaxis()
    fig.suptitle(f"fraction of this machine's limits, {threads} threads (red: noisy)")
    fig.tight_layout()
    return fig


def render_table(result: dict) -> str:
    """The readable summary ``gamexport bench`` prints."""
    lines = _head_lines(result)
    rows = [*result["prefill"], *result["decode"]]
    if rows:
        lines += _runtime_lines(rows)
    scaling = result.get("scaling")
    if scaling and scaling["points"]:
        lines += _scaling_lines(scaling)
    if result.get("ceilings"):
        lines += _ceiling_lines(result["ceilings"])
    if result.get("paired"):
        lines += _goal_lines(result["paired"])
    training = result.get("training")
    if training and training["rows"]:
        lines += _training_lines(training)
    st = result.get("startup")
    if st:
        demo = st.get("first_token_demo")
        lines.append(f"start-up: gamexport --help {st['help']['p50_ms']:.0f} ms; first token of gamexport generate "
                     f"{st['first_token']['p50_ms']:.0f} ms" + (f", on the demo model {demo['p50_ms']:.0f} ms"
                                                               if demo else ""))
    for s in result["skipped"]:
        what = " ".join(str(s[k]) for k in ("runtime", "precision", "section", "model", "block", "mode", "T")
                        if k in s)
        lines.append(f"skipped: {what}: {s['reason']}")
    return "\n".join(lines)


def _goal_lines(paired: dict) -> list[str]:
    """The performance goals as the paired rounds scored them: value (runner-up) and verdict."""
    lines = [f"goals, scored in {paired['rounds']} paired rounds (each item's fastest block; runner-up blocks):"]
    for g in paired["goals"]:
        if g["value"] is None:
            lines.append(f"  {g['goal']}: {g.get('no_verdict', 'not measured')}")
            continue
        said = ("not met, bounded: its weight MatMuls alone miss it too" if g["verdict"] == "bounded"
                else g["verdict"] or f"no verdict: {g['no_verdict']}")
        lines.append(f"  {g['goal']}: {g['value']:.2f} ({g['runner_up']:.2f}) → {said}")
    return lines


def _head_lines(result: dict) -> list[str]:
    """The machine, the model, the limits, and any invalid limit or busy machine."""
    lim = result["limits"]
    lines = [f"gamexport bench — {result['machine']['cpu']}, {result['threads']} threads"
             + ("  [--quick: smoke run, do not quote]" if result["quick"] else ""),
             f"model: {result['parameters']:,} parameters, {result['flops_per_token']['total'] / 1e6:.2f} MFLOP "
             f"per token (head at every position), {result['weight_bytes_per_step']['fp32'] / 1e6:.1f} MB fp32 "
             "weights per decode step",
             f"limits: compute {lim['compute']['gflops']:.1f} GFLOP/s ({lim['compute']['best']}), "
             f"bandwidth {lim['bandwidth']['gbps']:.1f} GB/s ({lim['bandwidth']['best']}), batched "
             f"{lim['batched']['gflops']:.1f} GFLOP/s ({lim['batched']['best']}); each the best of "
             f"{len(lim['compute']['candidates'])}, {len(lim['bandwidth']['candidates'])} and "
             f"{len(lim['batched']['candidates'])} kernels"]
    for bad in result.get("invalid_limits", []):
        lines.append(f"LIMIT INVALID: {bad['limit']} beaten by {', '.join(bad['beaten_by'])} — a fraction above "
                     "1.0 means the limit is too low, not the row fast")
    load = result.get("load") or {}
    if load.get("busy"):
        lines.append(f"BUSY: other processes used {load['other_cpu_cores']:.2f} cores during the run (more than "
                     f"{load['busy_above_cores']}): the timings are void")
    lines.append("")
    return lines


def _runtime_lines(rows: list[dict]) -> list[str]:
    """One line per prefill and decode row: its time, what it achieved, and its fraction of the limit."""
    header = f"{'runtime':<16} {'prec':<8} {'mode':<7} {'B×T':>12} {'p50 ms':>9} {'achieved':>18} {'of limit':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = shape_label(r)[1:]
        lines.append(f"{r['runtime']:<16} {r['precision']:<8} {r['mode']:<7} {shape:>12} {r['p50_ms']:>9.3f} "
                     f"{r['achieved']:>9.1f} {r['unit']:<8} {r['fraction']:>8.2f}"
                     + (f"  last/first {r['last_over_first']:.2f}" if "last_over_first" in r else "")
                     + ("  [noisy]" if r["noisy"] else "")
                     + ("  [limit invalid]" if r.get("limit_valid") is False else ""))
    lines.append("")
    return lines


def _scaling_lines(scaling: dict) -> list[str]:
    """The scaling points, the growth over 8× T and the Transformer ÷ GAM time per T."""
    lines = [f"scaling (one block, d {scaling['d_model']}, B 1, torch):"]
    head = f"{'block':<12} {'mode':<17} {'T':>6} {'p50 ms':>10} {'GFLOP/s':>8} {'peak MB':>8} {'+MB':>7}"
    lines += [head, "-" * len(head)]
    for p in scaling["points"]:
        extra = f"{p['peak_extra_mb']:>7.0f}" if p.get("peak_extra_mb") is not None else f"{'-':>7}"
        lines.append(f"{p['block']:<12} {p['mode']:<17} {p['T']:>6} {p['p50_ms']:>10.2f} {p['achieved']:>8.1f} "
                     f"{p['peak_rss_mb']:>8.0f} {extra}" + ("  [noisy]" if p["noisy"] else ""))
    for g in scaling["summary"]["growth_8x"]:
        lines.append(f"  {g['block']} {g['mode']}: T={g['to_T']} ÷ T={g['from_T']} = {g['time_ratio']:.2f} "
                     "(linear: 8)")
    for r in scaling["summary"]["transformer_over_gam"]:
        lines.append(f"  T={r['T']} {r['mode']}: Transformer ÷ GAM time {r['transformer_over_gam']:.2f} "
                     f"(FLOPs {r['flop_ratio']:.2f})")
    lines.append("")
    return lines


def _ceiling_lines(ceilings: dict) -> list[str]:
    """The weight MatMuls' own times and what they allow."""
    lines = [f"ceilings (the {ceilings['matmuls']} weight MatMuls alone, ONNX Runtime):"]
    for r in ceilings["rows"]:
        lines.append(f"  {r['precision']:<5} M={r['M']:<4} {r['p50_ms']:>9.3f} ms"
                     + ("  [noisy]" if r["noisy"] else ""))
    lines.append(f"  fp32 decode could reach {ceilings['fp32_decode_fraction']:.2f} of the roofline if the rest "
                 "were free; INT8 ÷ fp32 at most " + ", ".join(f"{v:.2f}× (M={k})" for k, v in
                                                          ceilings["int8_speedup"].items()))
    lines.append("")
    return lines


def _training_lines(training: dict) -> list[str]:
    """Training step times and tokens/s of GAM and the Transformer."""
    lines = [f"training (torch fp32, B {training['batch']} × T {training['T']}, AdamW steps):"]
    for r in training["rows"]:
        lines.append(f"  {r['model']:<12} d {r['d_model']:<5} {r['parameters']:>12,} parameters  "
                     f"{r['p50_ms']:>9.1f} ms/step  {r['tokens_per_s']:>8.0f} tokens/s"
                     + ("  [noisy]" if r["noisy"] else ""))
    if training["gam_over_transformer"] is not None:
        lines.append(f"  GAM ÷ Transformer tokens/s: {training['gam_over_transformer']:.2f}")
    lines.append("")
    return lines
