"""``gamexport parity DIR``: re-check a build folder's graphs (and engines) on this machine, without torch.

The build kept its parity inputs and eager fp32's outputs in ``DIR/parity/`` (``gamexport.parity.references``).
This plans the (runtime, precision) pairs asked for and opens each runner through ``gamexport.targets`` as the
build does, and hands it to ``gamexport.parity.engine.run_parity`` against those references: the same loop and
tolerance table as the build. The folder's onnxruntime-genai bundles go through og.Generator as the build runs them
(``gamexport.pipeline.genai``), against the same ONNX Runtime CPU runner, counted in the same verdict.
"""

from __future__ import annotations

from pathlib import Path

from gamexport.errors import GamexportError


def recheck(folder: str | Path, engines: tuple[str, ...] = ("onnxruntime",), precisions: tuple[str, ...] = (),
            device: str = "cpu", threads: int | None = None, progress=lambda m: None, genai: bool = True) -> dict:
    """The re-check report (rows in the build report's format) for every (runtime, precision) this machine
    supports over the folder's saved references; with ``genai``, each precision's onnxruntime-genai bundle through
    og.Generator against the ONNX Runtime CPU runner its parity rows just used."""
    from gamexport import targets  # looked up at call time: tests plant a broken runner through targets.open_runner
    from gamexport.parity.engine import run_parity
    from gamexport.parity.references import CALIBRATION_TEXT, PARITY_DIR, available_precisions, load_references
    from gamexport.pipeline.genai import BundleCheck
    from gamexport.report import recheck_report

    folder = Path(folder)
    if not (folder / PARITY_DIR / "feeds.json").is_file():
        raise GamexportError(f"{folder} has no {PARITY_DIR}/ references",
                             "rebuild it with this gamexport version (gamexport build)")
    have = available_precisions(folder)
    wanted = tuple(precisions) or have
    missing = [p for p in wanted if p not in have]
    if missing:
        raise GamexportError(f"{folder} has no {missing[0]} graphs", f"it has: {', '.join(have)}")
    saved = load_references(folder, wanted)
    plan = targets.plan(wanted, tuple(engines), device)
    options = targets.OpenOptions(threads=threads, say=progress)
    text = next((feed["input_ids"] for feed, label in zip(saved.prefill.inputs, saved.prefill.labels)
                 if label in ("text", CALIBRATION_TEXT)), None)
    bundles = BundleCheck(folder, text, progress) if genai else None
    rows = []
    runs = [(*pair, False) for pair in plan.pairs] + [(*pair, True) for pair in plan.structural]
    for runtime, precision, structural in runs:
        progress(f"parity: {runtime} {precision}" + (" (structural run)" if structural else ""))
        runner = targets.open_runner(runtime, precision, folder, saved.cfg, options, structural=structural)
        try:
            mine = run_parity(runner, saved, progress, threads)
            rows += mine
            # onnxruntime-genai's CPU package runs the graph the baseline runner just checked; a bundle adds to a
            # precision's gated rows, it never stands in for them ("nothing checked" stays about the graphs)
            if bundles is not None and runtime == targets.BASELINE[0] and not structural and \
                    any(r.gated for r in mine):
                bundles.run(precision, runner)
        finally:
            runner.close()
    skipped = [*plan.elsewhere, *plan.skipped]
    if targets.BASELINE in plan.pairs:
        mine, why = _prepacked_rows(folder, saved, options, threads, progress)
        rows += mine
        if why:
            skipped.append({"runtime": targets.BASELINE[0], "precision": "fp32", "graph": "step", "reason": why})
    return recheck_report(folder, rows, skipped, wanted, threads,
                          bundles.entries if bundles is not None else ())


def _prepacked_rows(folder: Path, saved, options, threads: int | None, progress) -> tuple[list, str | None]:
    """The rows of the step graph pre-packed for this machine, which ``gamexport generate`` opens here instead of
    step.onnx (checked against the manifest first, run as generate runs it: alone, prefill as one chunk); none
    where the folder has none, or none and why where it would not be used here (generate opens step.onnx then)."""
    from gamexport import targets
    from gamexport.engines.ort import prepacked_for_this_machine
    from gamexport.layout import PREPACKED_FILES, PREPACKED_STEP
    from gamexport.manifest import read_manifest, verify
    from gamexport.parity.engine import run_parity

    path, why = prepacked_for_this_machine(folder, read_manifest(folder)["files"])
    if path is None:
        if why:
            why = f"{why}, so it is not checked (gamexport generate opens step.onnx here)"
            progress(f"parity: {why}")
        return [], why
    verify(folder, list(PREPACKED_FILES))
    progress(f"parity: {targets.BASELINE[0]} {PREPACKED_STEP}")   # what gamexport generate opens here
    runner = targets.open_files(targets.BASELINE[0], None, path, saved.cfg, options)
    try:
        return run_parity(runner, saved, progress, threads), None
    finally:
        runner.close()
