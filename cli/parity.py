"""``gamexport parity``: re-check a build folder on this machine against the references it keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DebugOption, ThreadsOption, run, say


#: How to get a re-check that gates something (the fix of its "nothing was checked" line).
NOTHING_CHECKED_FIX = ("check a precision this machine runs (e.g. --precision fp32), or run on a machine where "
                       "the others run (TensorRT: --device cuda on an NVIDIA GPU), or rebuild a folder whose saved "
                       "parity feeds hold none (gamexport build); INT8 rows are gated "
                       "only in folders built from a checkpoint with tokenizer.json and heldout.txt")


def parity(
    folder: Annotated[Path, typer.Argument(help="A build folder (written by gamexport build).")],
    engines: Annotated[str, typer.Option(help="Engines, comma-separated: onnxruntime, tensorrt.")] = "onnxruntime",
    precision: Annotated[str | None, typer.Option(
        help="Precisions to check, comma-separated (default: every precision the folder has).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    report: Annotated[Path, typer.Option(help="Where to write the parity report (JSON): a new path or a regular "
                                              "file outside FOLDER.")] = Path(
        "parity-report.json"),
    threads: ThreadsOption = None,
    debug: DebugOption = False,
) -> None:
    """Re-run the folder's graphs here and compare them with the eager fp32 outputs saved at build time.

    With onnxruntime-genai installed, also runs each onnxruntime-genai bundle through og.Generator against
    gamexport's greedy decode, as the build does. Needs no torch, so it runs on the edge box itself. Exits 1 when
    a gated check fails, 2 when no row was gated (nothing was checked: that is not a pass).
    """

    def body() -> None:
        from gamexport.destinations import check_file
        from gamexport.pipeline.recheck import recheck
        from gamexport.fsutil import atomic_write_json

        # Checked first: a report goes to a regular file or a new path, never into the folder it checks.
        report_path = check_file(report, option="--report", guards={"the build folder": folder})
        split = lambda text: tuple(p.strip() for p in text.split(",") if p.strip())  # noqa: E731
        result = recheck(folder, split(engines), split(precision) if precision else (), device, threads, say)
        from gamexport.report import checked_rows, genai_line, parity_failure, parity_line

        for row in result["parity"]:
            print(parity_line(row))
        for entry in result["genai"]:
            print(genai_line(entry))
        from gamexport.parity import Verdict

        counted = Verdict.from_counts(result["parity_counts"])
        if counted.gated == 0:  # bad input, so nothing is written; the line says why (skipped precisions included)
            from gamexport.errors import NothingCheckedError

            raise NothingCheckedError(counted.nothing_checked(), NOTHING_CHECKED_FIX)
        atomic_write_json(report_path, result)
        for row in result["skipped"]:
            say(f"skipped: {row['runtime']} {row.get('precision', '')}: {row['reason']}")
        print(f"parity: {counted.headline()}; report: {report}")
        if not result["passed"]:
            from gamexport.errors import ParityError

            raise ParityError(parity_failure(checked_rows(result)),
                              f"read {report} for the measured differences; if the folder's graphs are intact "
                              "(gamexport verify), this machine's runtime computes differently: rebuild here")

    run(body, debug)
