"""Loss and perplexity curves of a training run, drawn from its metrics.jsonl records into PNG files.

Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works on machines without
a display and leaves any interactive session's backend alone. Without matplotlib the plots are skipped.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

from gamexport.fsutil import atomic_write_bytes


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing moving average, so the train-loss trend is readable through batch-to-batch noise."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def save_png(fig, path: Path) -> Path:
    """Render a matplotlib ``Figure`` on the Agg canvas and write it as a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def plot_metrics(records: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """Write ``loss.png`` (train and validation loss) and ``perplexity.png`` (validation) into ``out``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss/perplexity plots (pip install matplotlib)")
        return []
    out = Path(out)
    steps = [r["step"] for r in records if r.get("train_loss") is not None]
    train = [r["train_loss"] for r in records if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"], r["val_ppl"]) for r in records if r.get("val_loss") is not None]
    if not steps:
        return []

    written = []
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    window = len(train) // 50
    if window > 1:
        ax.plot(steps, train, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        ax.plot(steps, moving_average(train, window), color="tab:blue", linewidth=1.5,
                label=f"train (mean of last {window} steps)")
    else:
        ax.plot(steps, train, color="tab:blue", linewidth=1.2, label="train")
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", color="tab:orange", markersize=3,
                label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(save_png(fig, out / "loss.png"))

    if val:
        fig = Figure(figsize=(7, 4.2))
        ax = fig.add_subplot()
        ax.plot([v[0] for v in val], [v[2] for v in val], "o-", color="tab:orange", markersize=3)
        if max(v[2] for v in val) / max(min(v[2] for v in val), 1e-9) > 10:
            ax.set_yscale("log")
        best = min(val, key=lambda v: v[2])
        ax.set_title(f"validation perplexity (best {best[2]:.2f} at step {best[0]})")
        ax.set_xlabel("step")
        ax.set_ylabel("perplexity = exp(loss)")
        ax.grid(alpha=0.3, which="both")
        written.append(save_png(fig, out / "perplexity.png"))
    return written
