"""``gamexport build``: checkpoint → ONNX graphs → parity → latency → report, into a folder, atomically.

The build works in a staging folder beside the output and moves it into place only when it is complete and
every parity check passed, so the output folder holds the previous good build or the new one, never a mix.
A failed build keeps its staging folder as ``<out>.failed`` for diagnosis and says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gamexport import __version__
from gamexport.checkpoint import CONFIG_NAME, TOKENIZER_NAME, Checkpoint, load_checkpoint
from gamexport.config import GAMConfig, preset as get_preset
from gamexport.engines.benchmark import BUILD_LIMITS, annotate_latency, limits_summary, measure_limits
from gamexport.errors import ConfigError, GamexportError, NothingCheckedError, OutputError, ParityError
from gamexport.fsutil import (atomic_write_json, atomic_write_text, dumps_json, removable_lock, replace_dir,
                              sha256_file)

STAGES = ("load", "export", "check", "parity", "latency", "report", "commit")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int8-dyn")
GRAPH_PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # written by gamexport's own builder
ENGINES = ("onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")

Progress = Callable[[str], None]


@dataclass
class BuildOptions:
    source: str | None = None      # checkpoint file/folder; None: the embedded default
    out: Path = Path("gamexport-build")
    preset: str | None = None      # seeded weights of this preset when no source is given
    threads: int | None = None     # ONNX Runtime and torch intra-op threads (None: all cores)
    latency: bool = True
    latency_runs: int = 20
    prefill_lengths: tuple[int, ...] = ()  # batch-1 prefill lengths to time; () = (min(256, P),)
    precisions: tuple[str, ...] = ("fp32",)  # graph precisions to write; fp32 is always built
    engines: tuple[str, ...] = ("onnxruntime",)
    device: str = "cpu"
    trt_profile: dict | None = None   # {"min": "1x1", "opt": "1x256", "max": "8x256"} for TensorRT
    cuda_graph: bool = False          # TensorRT decode steps replay CUDA graphs (TrtRunner(cuda_graph=True))
    triton: Path | None = None        # also write a Triton model repository here (fp32)
    progress: Progress = field(default=lambda msg: None)


@dataclass
class BuildResult:
    out: Path
    report: dict
    passed: bool


# ---- sources ------------------------------------------------------------------------------------------------
def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(np.ascontiguousarray(weights[name], dtype=np.float32).tobytes())
    return h.hexdigest()


def demo_folder() -> Path | None:
    """The trained demo model shipped inside the package, if this install has one."""
    folder = Path(__file__).resolve().parent.parent / "gamexport" / "demo"
    if not folder.is_dir():
        from importlib import resources
        folder = Path(str(resources.files("gamexport").joinpath("demo")))
    return folder if (folder / "model.safetensors").is_file() else None


def seeded_checkpoint(preset_name: str, seed: int = 0) -> Checkpoint:
    """Seeded, untrained weights of a preset: exact-math parity works, generated text is noise."""
    from gamexport.model import build_model, state_dict_numpy

    cfg = get_preset(preset_name)
    weights = state_dict_numpy(build_model(cfg, seed=seed))
    return Checkpoint(config=cfg, weights=weights, source=f"<seeded '{preset_name}' preset, seed {seed}>",
                      sha256=weights_sha256(weights),
                      meta={"trained": False, "label": f"untrained: '{preset_name}' preset, seed {seed}"})


def resolve_source(source: str | None, preset_name: str | None) -> Checkpoint:
    if source is not None:
        if preset_name is not None:
            raise ConfigError("--preset chooses seeded weights and cannot be combined with a SOURCE",
                              "drop --preset (the config comes from the checkpoint)")
        return load_checkpoint(source)
    if preset_name is None:
        demo = demo_folder()
        if demo is not None:
            return load_checkpoint(demo)
        preset_name = "paper"
    return seeded_checkpoint(preset_name)


def is_trained(ckpt: Checkpoint) -> bool:
    return bool(ckpt.meta.get("trained", True))


# ---- output folder handling ---------------------------------------------------------------------------------
def check_destinations(opts: BuildOptions) -> tuple[Path, Path | None]:
    """Check every place the build will write, before it changes anything; returns (out, triton) resolved.

    ``--out`` must be new, empty or a previous build, ``OUT.failed`` (where a failing build keeps its output)
    the same, and ``--triton`` new, empty or a model repository whose gamexport models may be replaced; none
    of them may be, hold or lie inside the source or each other (``gamexport.destinations``).
    """
    from gamexport.destinations import ABSENT, BUILD, EMPTY, check_folder, classify

    source = opts.source if opts.source is not None else (demo_folder() if opts.preset is None else None)
    out = check_folder(opts.out, BUILD, guards={"the source": source})
    failed = out.with_name(out.name + ".failed")
    if classify(failed) not in (ABSENT, EMPTY, BUILD):
        raise OutputError(f"{failed} holds files that are not a gamexport build, and a failing build would put "
                          "its output there", "move it away, or pass another --out")
    triton = None
    if opts.triton is not None:
        from gamexport.engines.triton import GRAPHS, check_repository

        triton = check_repository(opts.triton, [f"gam_{graph}" for graph in GRAPHS],
                                  {"the source": source, "--out": out, "--out's failed-build folder": failed})
    return out, triton


@contextmanager
def locked_staging(out: Path) -> Iterator[Path]:
    """Hold ``.<out>.lock`` and yield a fresh staging folder beside ``out``; stale ones are removed first.

    The lock file is deleted when the build ends (``fsutil.removable_lock``); only a killed build leaves it,
    empty, and the next build takes it over and deletes it.
    """
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} is a file, not a folder", "pass --out a folder path")

    def busy() -> None:
        raise OutputError(f"another gamexport build is writing {out}", "wait for it to finish or choose another --out")

    with contextlib.ExitStack() as held:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(removable_lock(out.parent / f".{out.name}.lock", busy))
        except OSError as exc:
            raise OutputError(f"cannot write beside {out}: {exc.strerror or exc}",
                              "choose an output folder you can write to") from exc
        for stale in out.parent.glob(f".{out.name}.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = out.parent / f".{out.name}.staging-{os.getpid()}"
        try:
            staging.mkdir()
        except OSError as exc:
            raise OutputError(f"cannot create {staging}: {exc.strerror or exc}",
                              "choose an output folder you can write to") from exc
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _pause_hook(stage: str) -> None:
    """Test-only: GAMEXPORT_TEST_PAUSE_AT=<stage> makes the build announce and wait at that stage."""
    if os.environ.get("GAMEXPORT_TEST_PAUSE_AT") != stage:
        return
    marker = os.environ.get("GAMEXPORT_TEST_PAUSE_FILE")
    if marker:
        Path(marker).write_text(stage)
    time.sleep(float(os.environ.get("GAMEXPORT_TEST_PAUSE_SECONDS", "60")))


# ---- parity ----
HELD_OUT_NAME = "heldout.txt"


def held_out_ids(ckpt: Checkpoint, max_rows: int = 8) -> np.ndarray | None:
    """Real held-out text as token ids (rows of P tokens), when the source has a tokenizer and a held-out text.

    The text is ``heldout.txt`` beside the weights, or the file named by config.json's ``heldout_text``
    (relative to the checkpoint folder); training writes it from the validation split it recorded.
    """
    if ckpt.tokenizer_path is None or ckpt.source.startswith("<"):
        return None
    folder = Path(ckpt.source).parent
    name = ckpt.meta.get("heldout_text", HELD_OUT_NAME)
    path = (folder / str(name)).resolve()
    if not path.is_file() or folder.resolve() not in path.parents:
        return None
    from gamexport.tokenizer import Tokenizer

    P = ckpt.config.max_positions
    with open(path, encoding="utf-8", errors="replace") as f:   # only what is used, however big the file
        text = f.read(64 * P * max_rows)
    ids = np.asarray(Tokenizer.from_file(ckpt.tokenizer_path).encode(text), dtype=np.int64)
    ids = ids[ids < ckpt.config.vocab_size]
    if ids.size < P:
        return ids[None, :] if ids.size >= 2 else None
    rows = min(max_rows, ids.size // P)
    return ids[: rows * P].reshape(rows, P)

# ---- parity rows ------------------------------------------------------------------------------------------
def held_out(text_ids: np.ndarray | None) -> bool:
    """Whether the real text splits into calibration rows and held-out rows (at least one row each)."""
    return text_ids is not None and text_ids.shape[0] >= 2


def split_calibration(text_ids: np.ndarray | None, cfg: GAMConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """(calibration ids, evaluation ids): disjoint halves of the held-out rows; random ids without text."""
    if text_ids is None:
        from gamexport.parity import parity_inputs

        rng_ids = np.concatenate([v for v in parity_inputs(cfg.vocab_size, cfg.max_positions, seed=7).values()])
        return rng_ids, None
    if not held_out(text_ids):
        return text_ids, text_ids  # too little text to split: scored on the calibration text, not gated
    half = text_ids.shape[0] // 2
    return text_ids[:half], text_ids[half:]


def _row(runtime: str, graph: str, artifact: str, reference: str, input_name: str, ids: np.ndarray,
         metrics: dict, precision: str = "fp32", **extra) -> dict:
    return {"runtime": runtime, "precision": precision, "graph": graph, "artifact": artifact,
            "reference": reference, "input": input_name, "batch": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
            **metrics, **extra}


def run_chunks(runner, ids: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Feed ``ids`` through ``runner.step`` in chunks of ``sizes`` from the zero state; concatenated logits."""
    state = runner.empty_state(ids.shape[0])
    pos, outs = 0, []
    for size in sizes:
        logits, state = runner.step(ids[:, pos:pos + size], np.full((ids.shape[0], 1), pos, np.int64), state)
        outs.append(logits)
        pos += size
    return np.concatenate(outs, axis=1), state


def parity_checks(ckpt: Checkpoint, eager, ort_runners: dict[str, Callable[[], object]], progress: Progress,
                  text_ids: np.ndarray | None = None) -> tuple[list[dict], object]:
    """Every parity row of a build: eager vs float64 NumPy; each ONNX Runtime graph vs eager fp32.

    ``ort_runners`` maps each fp32 artifact ("functions", "inlined", "ort-format") to a function that opens its
    runner. They are opened one at a time and closed after their rows — each holds the model's weights (and ONNX
    Runtime's pre-packed copies), so three at once would triple the build's peak memory. The "functions" runner
    is returned open, for the latency stage.
    """
    from gamexport.parity import chunk_plan, compare_logits, parity_inputs, tolerance
    from gamexport.reference import reference_logits

    cfg = ckpt.config
    tol = tolerance("fp32")
    rows = []
    inputs = parity_inputs(cfg.vocab_size, cfg.max_positions)
    if text_ids is not None:
        inputs["text"] = text_ids[:, : cfg.max_positions]

    short = inputs["random"][:, : min(16, cfg.max_positions)]
    progress(f"parity: eager fp32 vs float64 NumPy reference on {short.shape[1]} tokens")
    ref64 = reference_logits(ckpt.weights, cfg, short)
    rows.append(_row("eager", "prefill", "gamexport.model (PyTorch)", "float64-numpy", "random", short,
                     compare_logits(ref64, eager.prefill(short)[0], tol)))

    sizes = chunk_plan(cfg.max_positions, cfg.kernel_size)
    refs = {name: eager.prefill(ids) for name, ids in inputs.items()}
    ref_logits, ref_state = refs["random"]
    logits, state = run_chunks(eager, inputs["random"], sizes)
    rows.append(_row("eager", "step", "gamexport.model (PyTorch)", "eager-fp32", "random", inputs["random"],
                     compare_logits(ref_logits, logits, tol, states=(ref_state, state)), chunks=sizes))
    kept = None
    for artifact, open_runner in ort_runners.items():
        runner = open_runner()
        runner.check_finite = False  # a NaN here is a failing row (exit 1), not a bad input; eager stays checked
        for name, ids in inputs.items():
            if artifact != "functions" and name != "random":
                continue
            ref_logits, ref_state = refs[name]
            progress(f"parity: onnxruntime-cpu {artifact} graphs vs eager on '{name}' tokens")
            logits, state = runner.prefill(ids)
            rows.append(_row("onnxruntime-cpu", "prefill", runner.model_path.name, "eager-fp32", name, ids,
                             compare_logits(ref_logits, logits, tol, states=(ref_state, state))))
            logits, state = run_chunks(runner, ids, sizes)
            rows.append(_row("onnxruntime-cpu", "step", runner.step_path.name, "eager-fp32", name, ids,
                             compare_logits(ref_logits, logits, tol, states=(ref_state, state)), chunks=sizes))
        if artifact != "functions":
            runner.close()
            continue
        kept = runner
        batch = np.concatenate([inputs["random"], inputs["ngram"]], axis=0)
        progress("parity: onnxruntime-cpu prefill at batch 2")
        ref_logits, ref_state = eager.prefill(batch)
        logits, state = runner.prefill(batch)
        rows.append(_row("onnxruntime-cpu", "prefill", runner.model_path.name, "eager-fp32", "random+ngram",
                         batch, compare_logits(ref_logits, logits, tol, states=(ref_state, state))))
    return rows, kept


def localise_divergence(ckpt: Checkpoint, runner, ids: np.ndarray) -> dict | None:
    """For a failing row: the relative error of the residual stream after every block, eager fp32 vs the graph,
    and the block where it grows most — where to look first. ONNX Runtime CPU graphs only."""
    if runner.runtime != "onnxruntime-cpu" or runner.model_path.suffix != ".onnx":
        return None
    import torch

    from gamexport.engines.ort import block_outputs
    from gamexport.model import build_model

    model = build_model(ckpt.config, ckpt.weights)
    captured: list[np.ndarray] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: captured.append(out[0].detach().numpy()))
             for b in model.blocks]
    with torch.inference_mode():
        model.prefill(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
    for h in hooks:
        h.remove()
    try:
        graph = block_outputs(runner.model_path, ids, ckpt.config.n_layers)
    except Exception as exc:  # a diagnostic must never hide the parity failure itself
        return {"error": f"could not read block outputs: {str(exc)[:200]}"}
    errors = [float(np.linalg.norm(g - r) / (np.linalg.norm(r) + 1e-30)) for g, r in zip(graph, captured)]
    growth = [errors[0]] + [b - a for a, b in zip(errors, errors[1:])]
    worst = int(np.argmax(growth))
    return {"block_rel_errors": errors, "largest_growth_block": f"blocks.{worst}",
            "summary": f"relative error of the residual stream grows most in blocks.{worst} "
                       f"({(errors[worst - 1] if worst else 0.0):.2%} → {errors[worst]:.2%})"}


def variant_parity_checks(ckpt: Checkpoint, eager, runner, progress: Progress,
                          text_ids: np.ndarray | None = None, emulate: dict | None = None,
                          threads: int | None = None) -> list[dict]:
    """Rows for a reduced-precision runner (ONNX Runtime or TensorRT) against eager fp32 under its precision's gate
    (the INT8 gate — perplexity on real text — needs ``text_ids``; without it the rows are informational); and, for
    half precision, against an independent emulation of the same precision plan:

    - computed in fp32 (ONNX Runtime's CPU provider): fp32 math on half-rounded weights, under the fp32
      tolerance (reference ``emulation-{p}-weights``) — so a graph that silently kept fp32 weights fails;
    - computed in fp16/bf16 (TensorRT, ONNX Runtime CUDA): eager PyTorch on CUDA running the plan (half weights
      and MatMuls, fp32 LayerNorm/Softmax/gates/conv; ``gamexport.graph.emulate``), prefill and chunked step
      (reference ``emulation-{p}``), gated by :func:`~gamexport.graph.emulate.half_plan_metrics` so that a graph
      silently computing in fp32 fails — or informational, saying why, when nothing can tell the two apart.
      Without a CUDA GPU for torch these rows are not produced, and the other rows' note says why.

    ``emulate`` (``engines.emulation.emulators``) adds the emulation rows of ``engines.emulation`` — prefill and
    chunked step of every input, logits and state — which replace the single fp16-weights row above.

    TensorRT rows also say whether the runner replayed CUDA graphs (``cuda_graph``)."""
    from gamexport.engines.eager import EagerRunner
    from gamexport.graph.emulate import emulation_device, half_plan_metrics, half_plan_references, round_weights
    from gamexport.parity import chunk_plan, compare_logits, parity_inputs, tolerance

    cfg = ckpt.config
    runner.check_finite = False  # a NaN here is a failing row (exit 1), not a bad input; eager stays checked
    p = runner.precision
    compute = getattr(runner, "compute_precision", p)
    inputs = {"random": parity_inputs(cfg.vocab_size, cfg.max_positions)["random"]}
    if text_ids is not None:
        inputs["text"] = text_ids[:, : cfg.max_positions]
    if runner.runtime == "tensorrt":
        note = f"{p}: TensorRT's strongly typed network computes in the graph's precision"
    elif p.startswith("int8"):
        ops = ", ".join(f"{v}× {k}" for k, v in (getattr(runner, "matmul_ops", None) or {}).items())
        note = f"{p}: ONNX Runtime's optimized graph multiplies with {ops or 'what the provider chose'}"
    elif p == "fp32":
        note = "fp32 weights and MatMuls"
    elif getattr(runner, "structural", False):
        from gamexport.engines.ort import BF16_STRUCTURAL

        note = BF16_STRUCTURAL
    elif compute == "fp32":
        note = f"{p} weights, fp32 compute (ONNX Runtime's CPU provider computes {p} MatMuls in fp32)"
    else:
        note = f"{p} weights and MatMuls"
    emulation = None
    if p in ("fp16", "bf16") and compute == "fp32" and f"emulation-{p}-weights" not in (emulate or {}):
        emulation = EagerRunner(cfg, round_weights(ckpt.weights, p))
        emulation.check_finite = False  # half-rounded weights may overflow: then the rows fail, as the graph's do
    plan_device, plan_where = None, ""
    if p in ("fp16", "bf16") and compute == p:
        plan_device, plan_where = emulation_device()
        if plan_device is None:
            skip = f"{p} plan emulation not run: {plan_where} (it runs eager PyTorch in {p} on CUDA)"
            progress(f"parity: {runner.runtime} {p}: {skip}")
            note += f"; {skip}"
    sizes = chunk_plan(cfg.max_positions, cfg.kernel_size)
    rows = []
    for name, ids in inputs.items():
        progress(f"parity: {runner.runtime} {p} graphs vs eager fp32 on '{name}' tokens")
        ref_logits, ref_state = eager.prefill(ids)
        logits, state = runner.prefill(ids)
        extra = {"compute_precision": compute, "note": note}
        # Perplexity needs the true next tokens: on real text only.
        targets = ids[:, 1:] if name == "text" else None
        cut = (lambda a: a[:, :-1]) if targets is not None else (lambda a: a)
        metrics = compare_logits(cut(ref_logits), cut(logits), tolerance(p), targets, states=(ref_state, state))
        if not metrics["passed"]:
            where = localise_divergence(ckpt, runner, ids)
            if where is not None:
                metrics["divergence"] = where
                progress(f"parity: {runner.runtime} {p} fails on '{name}'; {where.get('summary', where.get('error'))}")
        rows.append(_row(runner.runtime, "prefill", runner.model_path.name, "eager-fp32", name, ids, metrics,
                         precision=p, **extra))
        step_logits, step_state = run_chunks(runner, ids, sizes)
        rows.append(_row(runner.runtime, "step", runner.step_path.name, "eager-fp32", name, ids,
                         compare_logits(cut(ref_logits), cut(step_logits), tolerance(p), targets,
                                        states=(ref_state, step_state)), precision=p,
                         chunks=sizes, **extra))
        if emulation is not None and name == "random":
            emu_logits, _ = emulation.prefill(ids)
            metrics = compare_logits(emu_logits, logits, tolerance("fp32"))
            metrics["tolerances"]["reason"] = "must equal fp32 compute on half-rounded weights"
            rows.append(_row(runner.runtime, "prefill", runner.model_path.name, f"emulation-{p}-weights", name, ids,
                             metrics, precision=p, **extra))
        if plan_device is not None and name == "random":
            progress(f"parity: {runner.runtime} {p} vs the {p} plan emulated by eager PyTorch on {plan_where}")
            plan, fp32_compute = half_plan_references(ckpt.weights, cfg, ids, p, plan_device)
            for graph, artifact, test, more in (("prefill", runner.model_path.name, logits, {}),
                                                ("step", runner.step_path.name, step_logits, {"chunks": sizes})):
                metrics = half_plan_metrics(test, plan, fp32_compute, p)
                rows.append(_row(runner.runtime, graph, artifact, f"emulation-{p}", name, ids, metrics,
                                 precision=p, **more, **extra))
    if emulate:
        from .emulation import build_rows

        rows += [{**row, "compute_precision": compute, "note": note}
                 for row in build_rows(ckpt, runner, inputs, sizes, emulate, threads, progress)]
    if hasattr(runner, "cuda_graph_status"):  # TensorRT: say whether decode steps replayed CUDA graphs
        used, graph_note = bool(runner.cuda_graph_status["used"]), runner.cuda_graph_note()
        for row in rows:
            if row["graph"] == "step":  # prefill never runs as a graph
                row.update(cuda_graph=used, note=f"{row['note']}; {graph_note}")
    return rows


PARITY_DIR = "parity"


def write_parity_references(folder: Path, eager, cfg: GAMConfig, text_ids: np.ndarray | None) -> list[str]:
    """Keep the parity inputs and eager fp32's outputs in the build folder (Polygraphy JSON), short enough to be
    small (≤ 32 tokens), so ``gamexport parity`` and ``polygraphy run`` can re-check the graphs anywhere."""
    from gamexport.parity import CALIBRATION_TEXT, parity_inputs
    from gamexport.polyjson import save_feeds, save_run_results

    T = min(32, cfg.max_positions)
    inputs = {k: v[:, :T] for k, v in parity_inputs(cfg.vocab_size, cfg.max_positions, seed=3).items()}
    if text_ids is not None and text_ids.shape[1] >= 2:
        # The last row: held out from INT8 calibration — unless there is one row, which calibrated INT8 too.
        inputs["text" if held_out(text_ids) else CALIBRATION_TEXT] = text_ids[-1:, :T]
    names = list(inputs)
    feeds = [{"input_ids": inputs[n]} for n in names]
    outs = []
    for feed in feeds:
        logits, state = eager.prefill(feed["input_ids"])
        outs.append({"logits": logits, "conv_state": state})
    d = folder / PARITY_DIR
    d.mkdir(exist_ok=True)
    save_feeds(d / "prefill_inputs.json", feeds)
    save_run_results(d / "prefill_outputs.json", "eager-fp32", outs)
    # Step feeds: a chunk from the middle (state from prefill) and one decode token, per input.
    step_feeds, step_outs = [], []
    for n in names:
        ids = inputs[n]
        for start, size in ((T // 2, min(4, T - T // 2)), (T - 1, 1)):
            if start < 1 or size < 1:
                continue
            _, state = eager.prefill(ids[:, :start])
            feed = {"input_ids": ids[:, start:start + size], "position_ids": np.full((ids.shape[0], 1), start, np.int64),
                    "conv_state": state}
            logits, new_state = eager.step(feed["input_ids"], feed["position_ids"], state)
            step_feeds.append(feed)
            step_outs.append({"logits": logits, "conv_state_out": new_state})
    save_feeds(d / "step_inputs.json", step_feeds)
    save_run_results(d / "step_outputs.json", "eager-fp32", step_outs)
    atomic_write_json(d / "feeds.json", {"prefill": names, "step": [n for n in names for _ in range(
        len(step_feeds) // len(names))], "tokens": T, "reference": "eager PyTorch fp32"})
    return [f"{PARITY_DIR}/{f}" for f in ("prefill_inputs.json", "prefill_outputs.json", "step_inputs.json",
                                          "step_outputs.json", "feeds.json")]


# ---- latency ------------------------------------------------------------------------------------------------
def check_precisions(precisions: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        from gamexport.errors import InputError
        raise InputError(f"unknown precision {unknown[0]!r}", f"choose from {', '.join(PRECISIONS)}")
    return tuple(p for p in PRECISIONS if p == "fp32" or p in precisions)


def check_prefill_lengths(cfg: GAMConfig, lengths: tuple[int, ...]) -> tuple[int, ...]:
    from gamexport.errors import InputError

    for T in lengths:
        if not 1 <= T <= cfg.max_positions:
            raise InputError(f"prefill length {T} is outside 1..{cfg.max_positions}",
                             f"choose lengths within the model's {cfg.max_positions} positions")
    return lengths or (min(256, cfg.max_positions),)


def build_limits(cfg: GAMConfig, matrix, threads: int | None, progress: Progress) -> dict:
    """The machine's limits as ``gamexport bench`` defines them, measured in the build's own run (fewer runs)."""
    cpu_precisions = tuple(p for runtime, p in matrix if runtime == "onnxruntime-cpu") or ("fp32",)
    return measure_limits(cfg, cpu_precisions, threads or 1, BUILD_LIMITS, progress)


def latency_rows(eager, ort_runners: list, cfg: GAMConfig, threads: int | None, runs: int,
                 progress: Progress, prefill_lengths: tuple[int, ...] = ()) -> list[dict]:
    """Batch-1 prefill at each length (default min(256, P)) and per-token decode with state, for eager and
    ONNX Runtime in one run; ``speedup_vs_eager`` compares rows of the same mode and length."""
    from gamexport.bench import measure, measure_decode

    lengths = check_prefill_lengths(cfg, prefill_lengths)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(1, cfg.max_positions), dtype=np.int64)
    rows = []
    for runner in (eager, *ort_runners):
        runner.check_finite = False  # time the backend alone, the same work on every row (parity checked outputs)
        for T in lengths:
            progress(f"latency: {runner.runtime} {runner.precision} prefill, batch 1 × {T} tokens")
            timing = measure(lambda: runner.prefill(ids[:, :T]), warmup=2, runs=runs)
            rows.append({"runtime": runner.runtime, "precision": runner.precision, "graph": "prefill",
                         "mode": "prefill",
                         "batch": 1, "seq_len": T, **timing.as_dict(),
                         "tokens_per_s": T / (timing.p50_ms / 1e3), "threads": threads})
        progress(f"latency: {runner.runtime} {runner.precision} decode, one token per step with state")
        n = min(64, cfg.max_positions - 1)
        state = {"s": runner.prefill(ids[:, :1])[1]}

        def one(pos: int, runner=runner, state=state) -> None:
            state["s"] = runner.step(ids[:, pos:pos + 1], np.array([[pos]], np.int64), state["s"])[1]

        timing = measure_decode(one, range(1, 1 + n))
        rows.append({"runtime": runner.runtime, "precision": runner.precision, "graph": "step", "mode": "decode",
                     "batch": 1, "seq_len": 1, **timing.as_dict(),
                     "tokens_per_s": 1 / (timing.p50_ms / 1e3), "threads": threads})
    base = {(r["mode"], r["seq_len"]): r["p50_ms"] for r in rows if r["runtime"] == "eager"}
    for r in rows:
        r["speedup_vs_eager"] = base[(r["mode"], r["seq_len"])] / r["p50_ms"]
    return rows


#: (runtime, precision) pairs that cannot run, and why.
UNSUPPORTED = {
    ("onnxruntime-cpu", "bf16"): "ONNX Runtime's CPU provider has no bf16 kernels (MatMul, Add, Sigmoid); the bf16 "
                                 "graphs are for CUDA and TensorRT and are checked here structurally",
    ("onnxruntime-cuda", "int8-dyn"): "dynamic quantization (MatMulInteger) is a CPU-provider format",
    ("tensorrt", "int8-dyn"): "TensorRT takes explicit Q/DQ (int8), not MatMulInteger (int8-dyn)",
}


def plan_matrix(precisions: tuple[str, ...], engines: tuple[str, ...], device: str,
                cuda_graph: bool = False) -> tuple[list, list[dict]]:
    """The (runtime, precision) pairs this build runs, and ``skipped`` rows for the rest (with reasons).

    Asking for what this machine cannot have at all — a GPU that is not there, TensorRT that is not installed,
    TensorRT on the CPU — is an error in one line, raised before any work.
    """
    from gamexport.errors import InputError

    for engine in engines:
        if engine not in ENGINES:
            raise InputError(f"unknown engine {engine!r}", f"choose from {', '.join(ENGINES)}")
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}", f"choose from {', '.join(DEVICES)}")
    if not engines:
        raise InputError("no engine given", "pass --engines onnxruntime (or tensorrt on an NVIDIA GPU)")
    if "tensorrt" in engines and device != "cuda":
        raise InputError("TensorRT runs on NVIDIA GPUs only", "add --device cuda (on a machine with a GPU)")
    if cuda_graph and "tensorrt" not in engines:
        raise InputError("--cuda-graph applies to TensorRT's decode steps, and no TensorRT engine was asked for",
                         "add --engines tensorrt --device cuda, or drop --cuda-graph")
    skipped = [{"runtime": "eager-compile", "reason": "torch.compile takes minutes to compile on CPU; "
                "measured by the benchmark command, not by build"}]
    if device == "cuda":
        from gamexport.device import cuda_status

        usable, why = cuda_status()
        if not usable:
            raise InputError(f"--device cuda needs an NVIDIA GPU, but {why}",
                             "run on a machine with a GPU, or use --device cpu")
    else:
        skipped += [{"runtime": r, "reason": "not requested: pass --device cuda (and --engines tensorrt) on an "
                     "NVIDIA GPU"} for r in ("onnxruntime-cuda", "onnxruntime-trt", "tensorrt")]
    if "tensorrt" in engines:
        from gamexport.engines.trt import import_tensorrt

        import_tensorrt()  # one line with the install command when missing
    runtimes = []
    if "onnxruntime" in engines:
        runtimes.append("onnxruntime-cuda" if device == "cuda" else "onnxruntime-cpu")
    if "tensorrt" in engines:
        runtimes.append("tensorrt")
    pairs = []
    for runtime in runtimes:
        for precision in precisions:
            reason = UNSUPPORTED.get((runtime, precision))
            if reason:
                skipped.append({"runtime": runtime, "precision": precision, "reason": reason})
            else:
                pairs.append((runtime, precision))
    return pairs, skipped


def trt_profiles(cfg: GAMConfig, given: dict | None) -> dict | None:
    """--min/--opt/--max BATCHxSEQ shape the prefill profile; the step profile keeps its chunk range (1..P,
    opt 1 = decode) and takes the same batch bounds."""
    if not given:
        return None
    from gamexport.engines.trt import default_profile, make_profile

    prefill = make_profile(cfg, "prefill", given)
    step = default_profile(cfg, "step")
    return {"prefill": prefill, "step": {"min": f"{prefill.min[0]}x{step.min[1]}",
                                         "opt": f"{prefill.opt[0]}x{step.opt[1]}",
                                         "max": f"{prefill.max[0]}x{step.max[1]}"}}


#: Skipped (runtime, precision) pairs whose graphs are still checked, by a structural run on that runtime (never
#: timed): the bf16 graphs with bf16 weights upcast to fp32 and bf16 casts made fp32 (engines.ort.upcast_bf16).
STRUCTURAL = (("onnxruntime-cpu", "bf16"),)


def structural_runs(skipped: list[dict]) -> list[tuple[str, str]]:
    """The skipped pairs that get a structural run (:data:`STRUCTURAL`)."""
    return [(s["runtime"], s["precision"]) for s in skipped if (s["runtime"], s.get("precision")) in STRUCTURAL]


def open_variant_runner(staging: Path, cfg: GAMConfig, runtime: str, precision: str, threads: int | None,
                        trt_profile: dict | None, say: Progress, cuda_graph: bool = False, structural: bool = False):
    """A runner for one (runtime, precision) of the matrix over the staged graphs (TensorRT: builds engines);
    ``structural``: the structural run of a skipped pair (:data:`STRUCTURAL`)."""
    from gamexport.engines.ort import OrtRunner
    from gamexport.graph.builder import graph_file_name

    if structural:
        from gamexport.engines.ort import bf16_structural_runner

        return bf16_structural_runner(staging / graph_file_name("prefill", precision),
                                      staging / graph_file_name("step", precision), cfg, threads)
    if runtime == "tensorrt":
        from gamexport.engines.trt import TrtRunner, build_engines

        say(f"      tensorrt: building {precision} engines (prefill and step)")
        build_engines(staging, cfg, profiles=trt_profiles(cfg, trt_profile), precision=precision,
                      progress=lambda m: say("      " + m))
        return TrtRunner.from_folder(staging, precision=precision, cuda_graph=cuda_graph)
    provider = {"onnxruntime-cpu": "CPUExecutionProvider", "onnxruntime-cuda": "CUDAExecutionProvider"}[runtime]
    return OrtRunner(staging / graph_file_name("prefill", precision), staging / graph_file_name("step", precision),
                     cfg, threads, precision=precision, provider=provider)


# ---- report and manifest ------------------------------------------------------------------------------------
def write_plot(latency: list[dict], path: Path) -> bool:
    """Bar chart of p50 latency per runtime for prefill and decode; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import io

    modes = ["prefill", "decode"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, mode in zip(axes, modes):
        rows = [r for r in latency if r["mode"] == mode]
        names = [f"{r['runtime']}\n{r['precision']}" for r in rows]
        values = [r["p50_ms"] for r in rows]
        errs = [[r["p50_ms"] - r.get("min_ms", r["p50_ms"]) for r in rows],
                [r["p90_ms"] - r["p50_ms"] for r in rows]]
        ax.bar(names, values, yerr=errs, color=["#888888", "#2a7ab9", "#d9822b", "#3a9a4a"][: len(rows)])
        if rows:
            ax.set_title(f"{mode}: batch {rows[0]['batch']} × {rows[0]['seq_len']} tokens")
        ax.set_ylabel("p50 ms (bars: min..p90)")
    fig.suptitle("gamexport build latency (lower is better)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    from gamexport.fsutil import atomic_write_bytes
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_manifest(folder: Path, ckpt: Checkpoint) -> dict:
    """``manifest.json``: every file but itself with size and sha256, plus library versions; its ``kind``
    marks the folder as a build that a later build may replace (``gamexport.destinations``)."""
    from gamexport.bench import machine_info
    from gamexport.destinations import BUILD_KIND

    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    versions = machine_info(None)["versions"]
    manifest = {"schema_version": 1, "kind": BUILD_KIND, "gamexport_version": __version__, "files": files,
                "versions": {k: v for k, v in versions.items() if k in ("torch", "onnx", "onnxruntime",
                                                                         "onnxruntime-gpu", "numpy")},
                "source": {"path": ckpt.source, "sha256": ckpt.sha256}}
    atomic_write_json(folder / "manifest.json", manifest)
    return manifest


def parity_failure(rows: list[dict]) -> str:
    """What failed, for the one error line of a failed build or ``gamexport parity``: how many checks, and the
    first failing row (runtime, precision, graph, input) with its failed metrics and where it diverged."""
    gated = [r for r in rows if r.get("gated", True)]
    bad = [r for r in gated if not r["passed"]]
    first = bad[0]
    where = next((r["divergence"]["summary"] for r in bad if "summary" in r.get("divergence", {})), None)
    return (f"{len(bad)} of {len(gated)} gated parity checks failed (first: {first['runtime']} {first['precision']} "
            f"{first['graph']} on '{first['input']}': "
            f"{', '.join(first.get('failed_checks', [])) or first.get('error', 'see the report')}"
            + (f"; {where}" if where else "") + ")")


# ---- the build ----------------------------------------------------------------------------------------------
def build(opts: BuildOptions) -> BuildResult:
    """Run the whole build; raises ``ParityError`` (after keeping diagnostics) when a parity check fails."""
    from gamexport.bench import machine_info
    from gamexport.engines.eager import EagerRunner
    from gamexport.engines.ort import OrtRunner
    from gamexport.graph import export_graphs
    from gamexport.graph.builder import graph_file_name
    from gamexport.graph.checks import check_graph_file
    from gamexport.parity import mark_calibration_scored, verdict

    say = opts.progress
    out, triton = check_destinations(opts)
    threads = opts.threads or os.cpu_count()
    t_start = time.perf_counter()

    def stage(i: int, text: str) -> None:
        _pause_hook(STAGES[i])
        say(f"[{i + 1}/{len(STAGES)}] {text}  ({time.perf_counter() - t_start:.1f}s)")

    stage(0, "loading weights")
    ckpt = resolve_source(opts.source, opts.preset)
    cfg = ckpt.config
    check_prefill_lengths(cfg, opts.prefill_lengths)
    precisions = check_precisions(opts.precisions)
    matrix, skipped = plan_matrix(precisions, tuple(opts.engines), opts.device, opts.cuda_graph)
    if any(runtime == "tensorrt" for runtime, _ in matrix):
        trt_profiles(cfg, opts.trt_profile)  # a malformed profile fails now, not after the export
    say(f"      {ckpt.source}: {cfg.n_params():,} parameters"
        + ("" if is_trained(ckpt) else " (untrained seeded weights)"))
    with locked_staging(out) as staging:
        stage(1, f"exporting ONNX graphs to {out}")
        text_ids = held_out_ids(ckpt)
        if text_ids is not None:
            say(f"      real text: {text_ids.shape[0]} × {text_ids.shape[1]} held-out tokens")
        calib_ids, eval_ids = split_calibration(text_ids, cfg)
        calibration = None
        if "int8" in precisions:
            from gamexport.calibration import calibrate

            calibration = calibrate(cfg, ckpt.weights, [calib_ids])
            atomic_write_json(staging / "calibration.json", {
                "source": ("held-out text, the first half of its rows (the INT8 gate uses the other half)"
                           if held_out(text_ids) else "held-out text, its only row: too little to hold any out, "
                           "so the INT8 rows are scored on this calibration text and are informational"
                           if text_ids is not None else "random token ids: no tokenizer and held-out text, so the "
                           "INT8 gate is informational"),
                "rows": int(calib_ids.shape[0]), "tokens_per_row": int(calib_ids.shape[1]),
                "method": "max |activation|, symmetric, zero point 0", "amax": calibration})
        written = export_graphs(cfg, ckpt.weights, staging, ckpt.sha256,
                                tuple(p for p in precisions if p in GRAPH_PRECISIONS), calibration)
        if "int8-dyn" in precisions:
            from gamexport.engines.ort import write_int8_dynamic

            for kind in ("model", "step"):
                path = write_int8_dynamic(staging / f"{kind}.inlined.onnx", staging / f"{kind}.int8-dyn.onnx")
                written[path.name] = path
        from gamexport.engines.ort import write_ort_format

        for precision in ("fp32", "int8", "int8-dyn"):  # the CPU-provider precisions an edge box runs
            if precision in precisions:
                for kind in ("prefill", "step"):
                    for path in write_ort_format(staging / graph_file_name(kind, precision), staging):
                        written[path.name] = path
        artifacts = sorted(written)
        atomic_write_json(staging / CONFIG_NAME, {**ckpt.meta, **cfg.to_dict(),
                                                  "source": {"path": ckpt.source, "sha256": ckpt.sha256}})
        if ckpt.tokenizer_path is not None:
            shutil.copyfile(ckpt.tokenizer_path, staging / TOKENIZER_NAME)

        stage(2, "checking graphs (onnx checker, structure, ONNX Runtime load)")
        graph_checks = []
        for name in artifacts:
            if not name.endswith(".onnx"):
                continue  # .ort files are checked by running them (parity)
            precision = name.split(".")[1] if name.count(".") > 1 and name.split(".")[1] in PRECISIONS else "fp32"
            if precision == "int8-dyn":
                from gamexport.graph.checks import check_int8_dynamic_file

                check_int8_dynamic_file(staging / name, cfg)
                checks = ["onnx.checker full_check", f"every weight MatMul quantized ({5 * cfg.n_layers + 1} "
                          "MatMulInteger)"]
            else:
                check_graph_file(staging / name, cfg, precision)
                checks = ["onnx.checker full_check", "structure (functions, opset, I/O)",
                          "precision plan (MatMul types, fp32 islands)",
                          "function scope (no callee name in a caller's scope: TensorRT binds by name)"]
            graph_checks.append({"artifact": name, "precision": precision, "checks": checks, "passed": True})

        progress = lambda m: say("      " + m)  # noqa: E731
        # The machine's limits for the latency rows, measured now, before any model runner is open: the limits'
        # own weight matrices (as many bytes as the model) would otherwise add to the build's peak memory.
        limits = build_limits(cfg, matrix, threads, progress) if opts.latency else None

        stage(3, "parity against eager PyTorch and the float64 reference")
        eager = EagerRunner(cfg, ckpt.weights, threads=threads)
        # The fp32 graphs always run on ONNX Runtime's CPU provider, with functions and inlined, in full detail.
        ort_runners = {
            artifact: (lambda m=m, st=st: OrtRunner(staging / m, staging / st, cfg, threads))
            for artifact, m, st in (("functions", "model.onnx", "step.onnx"),
                                    ("inlined", "model.inlined.onnx", "step.inlined.onnx"),
                                    ("ort-format", "model.ort", "step.ort"))}
        parity, fp32_runner = parity_checks(ckpt, eager, ort_runners, progress, text_ids)
        from .emulation import emulators, write_emulation_references

        emulate = emulators(ckpt, precisions, calibration)
        variants = []
        for runtime, precision in matrix:
            if (runtime, precision) == ("onnxruntime-cpu", "fp32"):
                continue
            variants.append(open_variant_runner(staging, cfg, runtime, precision, threads, opts.trt_profile, say,
                                                opts.cuda_graph))
            parity += variant_parity_checks(ckpt, eager, variants[-1], progress, eval_ids, emulate, threads)
        for runtime, precision in structural_runs(skipped):  # checked, not timed
            runner = open_variant_runner(staging, cfg, runtime, precision, threads, None, say, structural=True)
            parity += variant_parity_checks(ckpt, eager, runner, progress, eval_ids, emulate, threads)
            runner.close()
        if not held_out(text_ids):  # the text also calibrated INT8: its INT8 rows are not a held-out gate
            parity = [mark_calibration_scored(r) for r in parity]
        counted = verdict(parity, skipped, precisions)  # informational rows are never counted as passed
        if counted.gated == 0:
            raise NothingCheckedError(counted.nothing_checked(), "this is a bug in gamexport (its fp32 rows are "
                                      "always gated): rerun with --debug and report it")
        passed = counted.passed
        write_parity_references(staging, eager, cfg, text_ids)
        write_emulation_references(staging, ckpt, precisions, calibration)

        latency: list[dict] = []
        if opts.latency:
            stage(4, f"latency, eager vs every runtime and precision, {threads} threads")
            timed = [fp32_runner] if ("onnxruntime-cpu", "fp32") in matrix else []
            latency = latency_rows(eager, [*timed, *variants], cfg, threads, opts.latency_runs, progress,
                                   opts.prefill_lengths)
            annotate_latency(latency, cfg, limits)
        else:
            stage(4, "latency skipped (--no-latency)")
        for runner in [fp32_runner, *variants]:
            runner.close()

        stage(5, "writing report")
        report = {
            "schema_version": 1, "gamexport_version": __version__, "passed": passed,
            "parity_counts": counted.counts(),
            "source": {"path": ckpt.source, "sha256": ckpt.sha256, "trained": is_trained(ckpt),
                       "label": str(ckpt.meta.get("label", ""))},
            "config": cfg.to_dict(), "parameters": cfg.n_params(), "receptive_field": cfg.receptive_field,
            "state_floats": cfg.n_layers * cfg.state_len * cfg.d_model,
            "machine": {**machine_info(threads), **({"limits": limits_summary(limits)} if limits else {})},
            "artifacts": artifacts, "graph_checks": graph_checks,
            "parity": parity, "latency": latency, "skipped": skipped,
        }
        from gamexport.report import render_markdown
        atomic_write_text(staging / "report.json", dumps_json(report))
        atomic_write_text(staging / "report.md", render_markdown(report))
        if latency:
            write_plot(latency, staging / "latency.png")
        write_manifest(staging, ckpt)

        if not passed:
            failed_dir = out.with_name(out.name + ".failed")
            shutil.rmtree(failed_dir, ignore_errors=True)
            os.replace(staging, failed_dir)
            raise ParityError(f"{parity_failure(parity)}; {out} was left as it was",
                              f"read {failed_dir / 'report.md'} for the measured differences")
        stage(6, f"moving the finished build into {out}")
        replace_dir(staging, out)
    if opts.triton is not None:
        from gamexport.engines.triton import choose_backend, write_model_repository

        backend, why = choose_backend(out, "fp32")
        models = write_model_repository(out, triton, backend=backend, precision="fp32")
        say(f"      triton: {', '.join(sorted(models))} in {opts.triton} ({why})")
    say(f"done in {time.perf_counter() - t_start:.1f}s: {out}")
    return BuildResult(out=out, report=report, passed=passed)


__all__ = ["BuildOptions", "BuildResult", "build", "resolve_source", "seeded_checkpoint", "STAGES",
           "GamexportError"]
