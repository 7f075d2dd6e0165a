"""The paper's Table 1, done honestly on this machine: GAM, Transformer and Mamba at equal size, budget and seeds.

    python -m gamexport.training.compare --out docs/results           # the full CPU protocol (~40 min, 2 cores)
    python -m gamexport.training.compare --smoke --out /tmp/cmp       # every code path in a minute (tests)

The protocol (``Protocol``): one small GAM shape (the ``compare`` training preset: d 160, 4 layers, 160 slots,
T 128, batch 16, vocabulary 4,096) and, for each baseline, the width whose parameter count is closest to GAM's
(``baselines.matched_config``, within ±5 %). Every model trains for the same number of steps — the same tokens,
in the same order — on each dataset, once per seed. The paper trained one unseeded run of each model; here every
number is a mean ± standard deviation over seeds, and the table says how many.

Per run it records what the paper's Table 1 has — parameters, time per epoch, validation loss and perplexity —
plus training tokens/s and the prefill latency of the model exported with ``torch.onnx.export`` and run by ONNX
Runtime (and eager PyTorch), both at batch 1 × T. Time per epoch is extrapolated from the measured training
tokens/s (the runs are shorter than an epoch) and says so.

Timings are void when other work shares the cores: the driver records the load average before and after, and
the report flags runs that started on a busy machine. Runs already finished in ``--runs`` are reused, so an
interrupted comparison continues where it stopped.

It then measures what the paper does not (``analysis``): the receptive field of the trained GAM and Transformer,
and multi-query associative recall against distance. Everything lands in ``OUT/results.json`` and PNG plots,
and ``docs/results.md`` is written from them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gamexport.machine import BUSY_CORES, cpu_seconds, other_cpu_cores
from gamexport.fsutil import atomic_write_json, atomic_write_text

PAPER_TABLE = {   # arXiv 2509.00605, Table 1: one unseeded run per model on a T4 GPU, raw WikiText-2
    "wikitext2": {"gam": (882.57, 117.2), "transformer": (918.99, 131.9), "mamba": (1017.54, 127.1)},
    "tinystories": {"gam": (23.15, 601.4), "transformer": (23.55, 671.6), "mamba": (None, None)},
}
KIND_LABEL = {"gam": "GAM", "transformer": "Transformer", "mamba": "Mamba"}


@dataclass(frozen=True)
class Protocol:
    preset: str = "compare"
    datasets: tuple[str, ...] = ("wikitext2", "tinystories")
    kinds: tuple[str, ...] = ("gam", "transformer", "mamba")
    seeds: tuple[int, ...] = (0, 1)
    max_steps: int = 150
    eval_every: int = 150
    threads: int = 2
    latency_seq: int = 128
    recall_steps: int = 1500
    recall_batch: int = 32
    recall_sequences: int = 2048


SMOKE = Protocol(preset="tiny", kinds=("gam", "transformer", "mamba"), seeds=(0, 1), max_steps=3, eval_every=3,
                 latency_seq=16, recall_steps=3, recall_sequences=64)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def load_trained(folder: Path):
    """A trained model of any kind from a run folder (config.json's "architecture" picks the class)."""
    import torch
    from safetensors.numpy import load_file

    from .baselines import lm_from_config

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = lm_from_config(config)
    tensors = {k: torch.from_numpy(v) for k, v in load_file(str(folder / "model.safetensors")).items()}
    tensors.setdefault("head.weight", tensors.get("token_embedding.weight"))
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def _held_out_ids(folder: Path, n: int) -> np.ndarray:
    from gamexport.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(folder / "tokenizer.json")
    text = (folder / "heldout.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text[: 40 * n])[:n]
    return np.asarray(ids, dtype=np.int64)


def run_name(dataset: str, kind: str, seed: int) -> str:
    """The run folder's name: a named dataset as it is, a file or folder by its stem."""
    from .data import is_named

    label = dataset if is_named(dataset) else Path(dataset).stem
    return f"{label}-{kind}-seed{seed}"


def one_run(protocol: Protocol, dataset: str, kind: str, seed: int, runs: Path, data_dir, log) -> dict[str, Any]:
    """Train (or reuse) one run, export it with torch.onnx.export and time its prefill; returns its record."""
    import torch

    from .loop import SUMMARY_NAME, read_metrics, train
    from .torch_export import export_onnx, ort_latency, torch_latency

    folder = runs / run_name(dataset, kind, seed)
    record_path = folder / "compare.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("protocol") == _protocol_key(protocol):
            log(f"{folder.name}: reusing the finished run")
            return record
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    resume = (folder / "run.json").is_file() and not (folder / SUMMARY_NAME).is_file()
    if (folder / SUMMARY_NAME).is_file():
        summary = json.loads((folder / SUMMARY_NAME).read_text(encoding="utf-8"))
    else:
        if folder.exists() and not resume:
            import shutil
            shutil.rmtree(folder)
        log(f"{folder.name}: training {protocol.max_steps} steps")
        summary = train(dataset=None if resume else dataset, preset=None if resume else protocol.preset,
                        out=folder, max_steps=None if resume else protocol.max_steps, resume=resume,
                        seed=None if resume else seed, data_dir=data_dir, eval_every=protocol.eval_every,
                        threads=protocol.threads, model=None if resume else kind, device="cpu", progress=False)
    model = load_trained(folder)
    torch.set_num_threads(protocol.threads)
    onnx_path = export_onnx(model, folder / "model.onnx", protocol.latency_seq)
    ort = ort_latency(onnx_path, 1, protocol.latency_seq, threads=protocol.threads)
    eager = torch_latency(model, 1, protocol.latency_seq, threads=protocol.threads)
    training = summary["training"]
    tokens_per_step = training["batch_size"] * training["seq_len"]
    record = {
        "protocol": _protocol_key(protocol), "dataset": dataset, "model": kind, "seed": seed,
        "params": summary["params"], "d_model": summary["config"]["d_model"],
        "steps": summary["steps"], "tokens": summary["steps"] * tokens_per_step,
        "tokens_per_s": summary["tokens_per_s"],
        "epoch_s": training["steps_per_epoch"] * tokens_per_step / summary["tokens_per_s"],
        "val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"],
        "ort_prefill_ms": ort["median_ms"], "eager_prefill_ms": eager["median_ms"],
        "curve": [(r["step"] * tokens_per_step, r["train_loss"]) for r in read_metrics(folder / "metrics.jsonl")
                  if r.get("train_loss") is not None],
        "flavour": summary["dataset"].get("flavour"), "held_out": summary["dataset"].get("held_out"),
        "other_cpu_cores": other_cpu_cores(cpu_before, cpu_seconds(), time.perf_counter() - started),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(record_path, record)
    log(f"{folder.name}: val ppl {record['val_ppl']:.2f}, {record['tokens_per_s']:,.0f} tokens/s, "
        f"ORT prefill {record['ort_prefill_ms']:.2f} ms")
    return record


def _protocol_key(protocol: Protocol) -> dict[str, Any]:
    return {"preset": protocol.preset, "max_steps": protocol.max_steps, "eval_every": protocol.eval_every,
            "threads": protocol.threads, "latency_seq": protocol.latency_seq}


def table(records: list[dict[str, Any]], protocol: Protocol) -> dict[str, list[dict[str, Any]]]:
    """Per dataset, one row per model: mean ± std over seeds of every column."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for dataset in protocol.datasets:
        rows[dataset] = []
        for kind in protocol.kinds:
            runs = [r for r in records if r["dataset"] == dataset and r["model"] == kind]
            if not runs:
                continue
            column = {key: [r[key] for r in runs] for key in
                      ("val_loss", "val_ppl", "tokens_per_s", "epoch_s", "ort_prefill_ms", "eager_prefill_ms")}
            rows[dataset].append({
                "model": kind, "params": runs[0]["params"], "d_model": runs[0]["d_model"], "seeds": len(runs),
                **{f"{key}_{stat}": value for key, v in column.items()
                   for stat, value in zip(("mean", "std"), _mean_std(v))},
                "busy": [r["seed"] for r in runs if (r.get("other_cpu_cores") or 0.0) > BUSY_CORES],
                "unmeasured": [r["seed"] for r in runs if r.get("other_cpu_cores") is None],
            })
    return rows


# ---- analyses --------------------------------------------------------------------------------------------------

def analyses(protocol: Protocol, runs: Path, log) -> dict[str, Any]:
    from .analysis import RecallTask, receptive_field, recall_study

    out: dict[str, Any] = {"receptive_field": {}}
    dataset = protocol.datasets[-1]
    for kind in ("gam", "transformer"):
        folder = runs / run_name(dataset, kind, protocol.seeds[0])
        if not folder.is_dir():
            continue
        model = load_trained(folder)
        T = min(128, model.config.max_positions)
        ids = _held_out_ids(folder, T)
        positions = list(range(0, max(1, T - 40), max(1, T // 16)))
        result = receptive_field(model, ids, positions)
        result["run"] = folder.name
        if kind == "gam":
            result["expected"] = 1 + model.config.n_layers * (model.config.kernel_size - 1)
        out["receptive_field"][kind] = result
        log(f"receptive field of {folder.name}: {result['receptive_field']} tokens")
    task = RecallTask()
    out["recall"] = recall_study(("gam", "transformer"), task, steps=protocol.recall_steps,
                                 batch=protocol.recall_batch, seed=0, log=log)
    return out


# ---- plots and the report --------------------------------------------------------------------------------------

def _figure(width=6.4, height=3.6):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height))


def _label(dataset: str) -> str:
    from .data import is_named

    return dataset if is_named(dataset) else Path(dataset).name


def plots(records: list[dict[str, Any]], extra: dict[str, Any], protocol: Protocol, out: Path) -> list[Path]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    from .plots import moving_average, save_png

    written = []
    fig = _figure(3.4 * len(protocol.datasets), 3.4)
    for i, dataset in enumerate(protocol.datasets):
        ax = fig.add_subplot(1, len(protocol.datasets), i + 1)
        for kind in protocol.kinds:
            for j, r in enumerate(r for r in records if r["dataset"] == dataset and r["model"] == kind):
                xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
                ax.plot([x / 1e6 for x in xs], moving_average(list(ys), 10), lw=1.2,
                        color=f"C{protocol.kinds.index(kind)}", alpha=0.85, label=KIND_LABEL[kind] if j == 0 else None)
        ax.set_title(_label(dataset))
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("training loss (nats/token, 10-step mean)")
        ax.legend(fontsize=8)
    written.append(save_png(fig, out / "training-loss.png"))

    rf = extra.get("receptive_field", {})
    if rf:
        fig = _figure()
        ax = fig.add_subplot()
        for kind, result in rf.items():
            changes = np.asarray(result["max_change"], dtype=float)
            offsets = np.arange(len(changes))
            shown = np.where(changes > 0, changes, np.nan)
            ax.semilogy(offsets, shown, marker=".", label=f"{KIND_LABEL[kind]} (measured field "
                                                          f"{result['receptive_field']} tokens)")
        if "gam" in rf:
            ax.axvline(rf["gam"]["expected"] - 0.5, color="gray", ls="--", lw=1,
                       label="GAM's 1 + L·(k−1) boundary")
        ax.set_xlabel("output offset after the perturbed token")
        ax.set_ylabel("largest logit change")
        ax.legend(fontsize=8)
        written.append(save_png(fig, out / "receptive-field.png"))

    recall = extra.get("recall")
    if recall:
        fig = _figure()
        ax = fig.add_subplot()
        for kind, result in recall["models"].items():
            ax.plot(result["distance"], [a if a is not None else np.nan for a in result["accuracy"]],
                    marker=".", label=f"{KIND_LABEL[kind]} ({result['params']:,} params)")
        ax.axhline(recall["chance"], color="gray", ls=":", lw=1, label="chance")
        ax.axvline(recall["gam_receptive_field"] - 0.5, color="gray", ls="--", lw=1, label="GAM receptive field")
        ax.set_xlabel("distance from the value to its query (tokens)")
        ax.set_ylabel("recall accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
        written.append(save_png(fig, out / "associative-recall.png"))
    return written


def machine(threads: int) -> dict[str, Any]:
    from gamexport.machine import machine_info

    return {**machine_info(threads), "date": time.strftime("%Y-%m-%d")}


def markdown(result: dict[str, Any], figures: list[str], images: str = "results") -> str:
    """The report; ``images`` is the plots' folder relative to the markdown file."""
    p = result["protocol"]
    m = result["machine"]
    lines = [
        "# Results: GAM against a Transformer and Mamba, on a CPU",
        "",
        "Generated by `python -m gamexport.training.compare` "
        f"({m['date']}; {m['cpu']}, {m['cores']} cores, {p['threads']} threads; "
        f"torch {m['versions'].get('torch', '?')}). "
        "Do not edit by hand: rerun the command.",
        "",
        "## Protocol",
        "",
        f"- Models: GAM of the `{p['preset']}` training preset and, for each baseline, the width whose parameter "
        "count is closest to GAM's (`baselines.matched_config`). Transformer: pre-LN GPT, 8 heads, "
        "`scaled_dot_product_attention`, 4d GELU MLP, learned positions, tied head. Mamba: selective-scan mixer "
        "with a residual and a norm per block, no MLP, tied head, a chunked parallel scan in pure PyTorch.",
        f"- Budget: {p['max_steps']} optimizer steps for every model ({result['tokens_per_run']:,} training tokens, "
        f"the same batches in the same order for a given seed), AdamW, warm-up and cosine decay; seeds "
        f"{', '.join(map(str, p['seeds']))} — every figure is mean ± standard deviation over those "
        f"{len(p['seeds'])} runs.",
        "- Validation: the whole held-out split (WikiText-2: its validation file, tokenized flavour; TinyStories: the "
        "last 5 % of the subset's stories), with each run's own BPE tokenizer trained on the training split "
        "(identical across runs of a dataset). Perplexities are per BPE token, so they are not comparable with the "
        "paper's (word-level raw WikiText-2, GPT-2 tokens, full epochs on a GPU).",
        "- Time per epoch is extrapolated from the measured training tokens/s (the runs are shorter than an epoch). "
        f"Latency: prefill of batch 1 × {p['latency_seq']} tokens, median of 20, for the graph exported by "
        "`torch.onnx.export` and run by ONNX Runtime (CPU), and for eager PyTorch.",
        "- The runs are made one at a time and are meant to have the machine to themselves: during each run the "
        "driver measures the CPU that other processes took (all CPU time in /proc/stat minus its own); a model "
        f"whose runs saw more than {BUSY_CORES} of a core taken is marked (busy) and its timings are void, one "
        "whose runs predate that measurement is marked (unmeasured).",
        "",
    ]
    for dataset, rows in result["table"].items():
        lines += [f"## {_label(dataset)}", "",
                  "| model | params | d | time/epoch (s) | tokens/s | val loss | val ppl | ORT prefill (ms) | "
                  "eager prefill (ms) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            def cell(key, digits):
                mean, std = row[f"{key}_mean"], row[f"{key}_std"]
                return "—" if math.isnan(mean) else f"{mean:,.{digits}f} ± {std:,.{digits}f}"
            flag = " (busy)" if row["busy"] else " (unmeasured)" if row.get("unmeasured") else ""
            lines.append(f"| {KIND_LABEL[row['model']]}{flag} | {row['params']:,} | {row['d_model']} | "
                         f"{cell('epoch_s', 0)} | {cell('tokens_per_s', 0)} | {cell('val_loss', 3)} | "
                         f"{cell('val_ppl', 2)} | {cell('ort_prefill_ms', 2)} | {cell('eager_prefill_ms', 2)} |")
        paper = PAPER_TABLE.get(dataset, {})
        if paper:
            cited = ", ".join(f"{KIND_LABEL[k]} {ppl} ppl / {sec} s per epoch" for k, (ppl, sec) in paper.items()
                              if ppl is not None)
            lines += ["", f"The paper (one unseeded run each, T4 GPU, 22.6M-parameter models): {cited}."]
        lines.append("")
    if "training-loss.png" in figures:
        lines += ["![training loss against training tokens, every run](IMAGES/training-loss.png)", ""]
    rf = result["analyses"].get("receptive_field", {})
    if rf:
        lines += ["## Receptive field of the trained models", "",
                  "One input token of held-out text is replaced, the model runs again, and every output after it "
                  "is compared with the original run (largest logit change over the vocabulary; outputs before "
                  "it never move). An output counts as moved when the change exceeds 1e-5 of the mean |logit|.", ""]
        for kind, r in rf.items():
            expected = f" (expected 1 + L·(k−1) = {r['expected']})" if "expected" in r else ""
            lines.append(f"- {KIND_LABEL[kind]} ({r['run']}): outputs up to {r['receptive_field'] - 1} tokens after "
                         f"the perturbed one move — a receptive field of {r['receptive_field']} tokens{expected}.")
        lines.append("")
        if "receptive-field.png" in figures:
            lines += ["![logit change against offset](IMAGES/receptive-field.png)", ""]
    recall = result["analyses"].get("recall")
    if recall:
        from .analysis import accuracy_within

        task = recall["task"]
        rf_gam = recall["gam_receptive_field"]
        lines += ["## Multi-query associative recall", "",
                  f"Sequences of {task['seq_len']} tokens hold {task['n_pairs']} key–value pairs among noise "
                  f"({task['n_keys']} keys, {task['n_values']} values, {task['n_noise']} noise tokens); each key "
                  f"returns later as a query, {1}–{task['max_distance']} tokens after its value, and the model "
                  f"must name the value (scored as the argmax over the value tokens; chance "
                  f"{recall['chance']:.3f}). Both models: {recall['steps']} AdamW steps of {recall['batch']} fresh "
                  f"sequences, seed {recall['seed']}, 2 layers; the GAM's receptive field is {rf_gam} tokens.", "",
                  "| model | params | accuracy, distance ≤ "
                  f"{rf_gam - 2} | distance {rf_gam - 1}–16 | distance 17–{task['max_distance']} | all |",
                  "|---|---:|---:|---:|---:|---:|"]
        for kind, r in recall["models"].items():
            lines.append(f"| {KIND_LABEL[kind]} | {r['params']:,} | {accuracy_within(r, 1, rf_gam - 2):.3f} | "
                         f"{accuracy_within(r, rf_gam - 1, 16):.3f} | "
                         f"{accuracy_within(r, 17, task['max_distance']):.3f} | {r['overall']:.3f} |")
        lines.append("")
        if "associative-recall.png" in figures:
            lines += ["![recall accuracy against distance](IMAGES/associative-recall.png)", ""]
    lines += ["## Raw data", "", "Every run's record (per-seed numbers, load averages, curves): "
              "[results.json](IMAGES/results.json).", ""]
    return "\n".join(lines).replace("](IMAGES/", f"]({images}/")


def run_compare(out: Path, runs: Path, protocol: Protocol = Protocol(), data_dir=None, doc: Path | None = None,
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Run the whole comparison; write OUT/results.json, OUT/*.png and (if given) the markdown report ``doc``."""
    out, runs = Path(out), Path(runs)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    total = len(protocol.datasets) * len(protocol.kinds) * len(protocol.seeds)
    for dataset in protocol.datasets:
        for kind in protocol.kinds:
            for seed in protocol.seeds:
                log(f"[{len(records) + 1}/{total}] {dataset} {kind} seed {seed}")
                records.append(one_run(protocol, dataset, kind, seed, runs, data_dir, log))
    cached = out / "results.json"
    key = {"runs": [(r["dataset"], r["model"], r["seed"], r["val_loss"]) for r in records],
           "recall_steps": protocol.recall_steps, "recall_batch": protocol.recall_batch}
    previous = json.loads(cached.read_text(encoding="utf-8")) if cached.is_file() else {}
    if previous.get("analyses_key") == json.loads(json.dumps(key)):
        log("analyses: reusing the previous results (same runs, same recall protocol)")
        extra = previous["analyses"]
    else:
        extra = analyses(protocol, runs, log)
    result = {"protocol": {**asdict(protocol)}, "machine": machine(protocol.threads), "table": table(records, protocol),
              "tokens_per_run": records[0]["tokens"] if records else 0, "runs": records, "analyses": extra,
              "analyses_key": key}
    figures = [p.name for p in plots(records, extra, protocol, out)]
    atomic_write_json(out / "results.json", result)
    if doc is not None:
        images = Path(os.path.relpath(out.resolve(), Path(doc).resolve().parent)).as_posix()
        atomic_write_text(doc, markdown(result, figures, images))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for results.json and plots")
    parser.add_argument("--doc", type=Path, default=None,
                        help="markdown report to write (default: OUT/../results.md, i.e. docs/results.md)")
    parser.add_argument("--runs", type=Path, default=Path("runs/compare"), help="training runs (reused if done)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--datasets", nargs="+", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 3 steps: checks the code paths only")
    args = parser.parse_args(argv)
    protocol = SMOKE if args.smoke else Protocol()
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in
               (("seeds", args.seeds), ("max_steps", args.max_steps), ("datasets", args.datasets)) if v}
    if changes:
        from dataclasses import replace
        protocol = replace(protocol, **changes)
    doc = args.doc or args.out.parent / "results.md"
    from gamexport.errors import GamexportError
    try:
        run_compare(args.out, args.runs, protocol, args.data_dir, doc)
    except GamexportError as exc:
        print(f"error: {exc.line()}", file=sys.stderr)
        return 2
    print(f"wrote {doc} and {args.out}/results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
