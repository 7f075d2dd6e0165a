"""``gamexport parity DIR``: re-check a build folder's graphs (and engines) on this machine, without torch.

The build kept its parity inputs and eager fp32's outputs in ``DIR/parity/`` (Polygraphy JSON). This runs the
folder's graphs on the engines and precisions asked for, compares them with those references under the same
tolerance table as the build, and returns rows in the build report's format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gamexport.errors import GamexportError
from gamexport.jsonfile import List, Obj, Str, read_json
from gamexport.manifest import verify


def available_precisions(folder: Path) -> tuple[str, ...]:
    from gamexport.graph.builder import graph_file_name

    from .pipeline import PRECISIONS

    return tuple(p for p in PRECISIONS
                 if (folder / graph_file_name("prefill", p)).is_file() and (folder / graph_file_name("step", p)).is_file())


#: parity/feeds.json: the label of every saved feed ("text", "random", …), per graph.
FEEDS_NAMES = Obj(required={"prefill": List(Str(max_len=100)), "step": List(Str(max_len=100))})
#: The arrays each saved feed and reference must hold, per graph.
REFERENCE_KEYS = {"prefill": (("input_ids",), ("logits", "conv_state")),
                  "step": (("input_ids", "position_ids", "conv_state"), ("logits", "conv_state_out"))}
#: Each array's dtype kinds and rank.
REFERENCE_ARRAYS = {"input_ids": ("iu", 2), "position_ids": ("iu", 2), "conv_state": ("f", 4),
                    "conv_state_out": ("f", 4), "logits": ("f", 3)}


def _check_references(pdir: Path, graph: str, feeds: list, refs: list, labels: list) -> None:
    """Inputs, reference outputs and labels of one graph agree in number and hold the arrays the check reads."""
    if not len(feeds) == len(refs) == len(labels):
        raise GamexportError(f"{pdir} holds {len(feeds)} {graph} inputs, {len(refs)} reference outputs and "
                             f"{len(labels)} labels; they must be as many", "rebuild the folder with gamexport build")
    need_in, need_out = REFERENCE_KEYS[graph]
    for i, (feed, ref) in enumerate(zip(feeds, refs)):
        for file, have, need in (("inputs", feed, need_in), ("outputs", ref, need_out)):
            where = pdir / f"{graph}_{file}.json"
            for key in need:
                if key not in have:
                    raise GamexportError(f"{where}: entry {i} has no {key}", "rebuild the folder with gamexport build")
                arr, (kind, rank) = have[key], REFERENCE_ARRAYS[key]
                if arr.dtype.kind not in kind or arr.ndim != rank:
                    raise GamexportError(f"{where}: entry {i}'s {key} is a {arr.ndim}-d {arr.dtype} array, expected "
                                         f"{rank}-d {'integer' if kind == 'iu' else 'float'}",
                                         "rebuild the folder with gamexport build")
        if ref["logits"].shape[:2] != feed["input_ids"].shape:
            raise GamexportError(f"{pdir / f'{graph}_outputs.json'}: entry {i}'s logits {ref['logits'].shape} do "
                                 f"not match its input_ids {feed['input_ids'].shape}",
                                 "rebuild the folder with gamexport build")


def _chunked_text_row(runner, prefill_row: dict, ids: np.ndarray, ref_logits: np.ndarray, tol, kernel_size: int
                      ) -> dict:
    """The step graph fed the whole saved text in chunks from the empty state, against the saved prefill
    reference, under the perplexity gate: as the build gates INT8 step graphs (a saved step feed is too short for
    a perplexity)."""
    from gamexport.parity import chunk_plan, compare_logits

    from .pipeline import run_chunks

    sizes = chunk_plan(ids.shape[1], kernel_size)
    logits, _ = run_chunks(runner, ids, sizes)
    path = getattr(runner, "step_path", None)
    artifact = path.name if path is not None else f"tensorrt/step.{prefill_row['precision']}.plan"
    same = {k: prefill_row[k] for k in ("runtime", "precision", "reference", "input", "batch", "seq_len")}
    row = {**same, "graph": "step", "artifact": artifact, "chunks": sizes,
           **compare_logits(ref_logits[:, :-1], logits[:, :-1], tol, ids[:, 1:])}
    if row["precision"] == "int8-dyn":
        # Dynamic quantization picks its activation scales per call, so 1-token chunks quantize differently from
        # the prefill; over the few saved tokens that alone moved an intact demo build past the 2 % gate
        # (tests/test_zoo.py::test_unmutated_build_passes_its_gated_rows_and_the_recheck). Reported, not gated.
        row.update(gated=False, passed=True, note=INT8_DYN_CHUNKED)
    return row


INT8_DYN_CHUNKED = ("int8-dyn quantizes each chunk with its own run-time scales: too few saved tokens for the "
                    "perplexity gate")


def recheck(folder: str | Path, engines: tuple[str, ...] = ("onnxruntime",), precisions: tuple[str, ...] = (),
            device: str = "cpu", threads: int | None = None, progress=lambda m: None) -> dict:
    """Parity rows for every (runtime, precision) this machine supports over the folder's saved references."""
    from gamexport.graph import read_graph_config
    from gamexport.graph.builder import graph_file_name
    from gamexport.parity import CALIBRATION_TEXT, compare_logits, mark_calibration_scored, tolerance
    from gamexport.polyjson import load_feeds, load_run_results

    from .pipeline import PARITY_DIR, open_variant_runner, plan_matrix, structural_runs

    folder = Path(folder)
    pdir = folder / PARITY_DIR
    if not (pdir / "feeds.json").is_file():
        raise GamexportError(f"{folder} has no {PARITY_DIR}/ references",
                             "rebuild it with this gamexport version (gamexport build)")
    have = available_precisions(folder)
    wanted = tuple(precisions) or have
    missing = [p for p in wanted if p not in have]
    if missing:
        raise GamexportError(f"{folder} has no {missing[0]} graphs", f"it has: {', '.join(have)}")
    verify(folder, [f"{PARITY_DIR}/{n}" for n in ("prefill_inputs.json", "prefill_outputs.json", "step_inputs.json",
                                                   "step_outputs.json", "feeds.json")]
           + [graph_file_name(k, p) for p in wanted for k in ("prefill", "step")])
    cfg, _ = read_graph_config(folder / "model.onnx")
    names = read_json(pdir / "feeds.json", schema=FEEDS_NAMES, fix="rebuild the folder with gamexport build")
    pre_in, pre_out = load_feeds(pdir / "prefill_inputs.json"), load_run_results(pdir / "prefill_outputs.json")
    step_in, step_out = load_feeds(pdir / "step_inputs.json"), load_run_results(pdir / "step_outputs.json")
    _check_references(pdir, "prefill", pre_in, pre_out, names["prefill"])
    _check_references(pdir, "step", step_in, step_out, names["step"])
    matrix, skipped = plan_matrix(wanted, tuple(engines), device)
    skipped = [row for row in skipped if row["runtime"] != "eager-compile"]  # no eager here
    rows = []
    runs = [(*pair, False) for pair in matrix] + [(*pair, True) for pair in structural_runs(skipped)]
    for runtime, precision, structural in runs:
        progress(f"parity: {runtime} {precision}" + (" (structural run)" if structural else ""))
        runner = open_variant_runner(folder, cfg, runtime, precision, threads, None, progress, structural=structural)
        runner.check_finite = False  # a NaN is a failing row here (exit 1), measured against the saved reference
        tol = tolerance(precision)
        try:
            for graph, feeds, refs, labels in (("prefill", pre_in, pre_out, names["prefill"]),
                                               ("step", step_in, step_out, names["step"])):
                for feed, ref, label in zip(feeds, refs, labels):
                    ids = feed["input_ids"]
                    if graph == "prefill":
                        logits, state = runner.prefill(ids)
                        ref_state = ref["conv_state"]
                    else:
                        logits, state = runner.step(ids, feed["position_ids"], feed["conv_state"])
                        ref_state = ref["conv_state_out"]
                    targets = ids[:, 1:] if label in ("text", CALIBRATION_TEXT) and graph == "prefill" else None
                    cut = (lambda a: a[:, :-1]) if targets is not None else (lambda a: a)
                    metrics = compare_logits(cut(ref["logits"]), cut(logits), tol, targets,
                                             states=(ref_state, state))  # every precision: state gates
                    path = getattr(runner, "model_path" if graph == "prefill" else "step_path", None)
                    artifact = path.name if path is not None else f"tensorrt/{graph}.{precision}.plan"
                    rows.append({"runtime": runtime, "precision": precision, "graph": graph, "artifact": artifact,
                                 "reference": "eager-fp32", "input": label, "batch": int(ids.shape[0]),
                                 "seq_len": int(ids.shape[1]), **metrics})
                    if targets is not None and tol.needs_targets:  # the step graph under the same gate
                        rows.append(_chunked_text_row(runner, rows[-1], ids, ref["logits"], tol, cfg.kernel_size))
            from .emulation import recheck_rows  # the emulation references the build kept (fp16 weights, INT8 plan)

            rows += recheck_rows(folder, runner, {"prefill": (pre_in, names["prefill"]),
                                                  "step": (step_in, names["step"])}, threads)
        finally:
            runner.close()
    # INT8 rows on the text INT8 was calibrated on (the build had too little text to hold any out): not a gate.
    rows = [mark_calibration_scored(r) if r["input"] == CALIBRATION_TEXT else r for r in rows]
    from gamexport.bench import machine_info
    from gamexport.parity import verdict

    counted = verdict(rows, skipped, wanted)
    return {"schema_version": 1, "folder": str(folder), "passed": counted.passed, "parity_counts": counted.counts(),
            "machine": machine_info(threads), "parity": rows, "skipped": skipped}
