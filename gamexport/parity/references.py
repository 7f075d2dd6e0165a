"""What the parity rows are scored on: the real held-out text, and the references a build keeps in ``DIR/parity/``.

A build compares every graph with eager PyTorch fp32 run now; it also keeps short parity inputs and eager fp32's
outputs on them in ``DIR/parity/`` (Polygraphy JSON, ``gamexport.polyjson``), so that ``gamexport parity DIR``
re-checks the graphs anywhere without torch, and ``polygraphy run --load-inputs/--load-outputs`` can too:

- ``prefill_inputs.json`` / ``prefill_outputs.json``: whole sequences and their logits and final state;
- ``step_inputs.json`` / ``step_outputs.json``: a chunk from the middle and one decode token per sequence, each
  with its positions and the state before it, and the logits and state after;

every array under the graphs' own input and output names (``gamexport.config.io_spec``: one state per layer), so
the feeds go to a graph as they are;
- ``feeds.json``: the label of every feed ("random", "text", …), per graph.

Emulation references (``emulation.py``) add ``prefill_outputs.<reference>.json`` / ``step_outputs.<reference>.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gamexport.config import INPUT_IDS, LOGITS, POSITION_IDS, io_spec, last_position, state_layer
from gamexport.errors import GamexportError
from gamexport.jsonfile import List, Obj, Str

from gamexport.layout import HELD_OUT as HELD_OUT_NAME
from gamexport.layout import PARITY_DIR

from gamexport.state import past_tensors, present_tensors

from .metrics import CALIBRATION_TEXT, TOLERANCES, parity_inputs

#: The files of ``DIR/parity/`` that eager fp32's references live in.
REFERENCE_FILES = ("prefill_inputs.json", "prefill_outputs.json", "step_inputs.json", "step_outputs.json",
                   "feeds.json")
_REBUILD = "rebuild the folder with gamexport build"


# ---- the real text ----------------------------------------------------------------------------------------
def held_out_ids(ckpt, max_rows: int = 8) -> np.ndarray | None:
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


def held_out(text_ids: np.ndarray | None) -> bool:
    """Whether the real text splits into calibration rows and held-out rows (at least one row each)."""
    return text_ids is not None and text_ids.shape[0] >= 2


def split_calibration(text_ids: np.ndarray | None, cfg) -> tuple[np.ndarray, np.ndarray | None]:
    """(calibration ids, evaluation ids): disjoint halves of the held-out rows; random ids without text."""
    if text_ids is None:
        rng_ids = np.concatenate([v for v in parity_inputs(cfg.vocab_size, cfg.max_positions, seed=7).values()])
        return rng_ids, None
    if not held_out(text_ids):
        return text_ids, text_ids  # too little text to split: scored on the calibration text, not gated
    half = text_ids.shape[0] // 2
    return text_ids[:half], text_ids[half:]


# ---- writing DIR/parity/ ----------------------------------------------------------------------------------
def write_parity_references(folder: Path, eager, cfg, text_ids: np.ndarray | None) -> list[str]:
    """Keep the parity inputs and eager fp32's outputs in the build folder (Polygraphy JSON), short enough to be
    small (≤ 32 tokens), so ``gamexport parity`` and ``polygraphy run`` can re-check the graphs anywhere."""
    from gamexport.fsutil import atomic_write_json
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
        outs.append({LOGITS: logits, **present_tensors(state)})
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
            positions = np.broadcast_to(np.arange(start, start + size, dtype=np.int64), (ids.shape[0], size))
            feed = {INPUT_IDS: ids[:, start:start + size], POSITION_IDS: positions.copy(), **past_tensors(state)}
            logits, new_state = eager.step(feed[INPUT_IDS], feed[POSITION_IDS], state)
            step_feeds.append(feed)
            step_outs.append({LOGITS: last_position(logits), **present_tensors(new_state)})  # as the graph returns
    save_feeds(d / "step_inputs.json", step_feeds)
    save_run_results(d / "step_outputs.json", "eager-fp32", step_outs)
    atomic_write_json(d / "feeds.json", {"prefill": names, "step": [n for n in names for _ in range(
        len(step_feeds) // len(names))], "tokens": T, "reference": "eager PyTorch fp32"})
    return [f"{PARITY_DIR}/{f}" for f in REFERENCE_FILES]


# ---- reading DIR/parity/ ----------------------------------------------------------------------------------
def available_precisions(folder: Path) -> tuple[str, ...]:
    """The precisions whose prefill and step graphs the folder holds (every precision has a tolerance)."""
    from gamexport.layout import graph_file

    return tuple(p for p in TOLERANCES
                 if (folder / graph_file("prefill", p)).is_file() and (folder / graph_file("step", p)).is_file())


#: parity/feeds.json: the label of every saved feed ("text", "random", …), per graph.
FEEDS_NAMES = Obj(required={"prefill": List(Str(max_len=100)), "step": List(Str(max_len=100))})

def reference_keys(cfg, graph: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The arrays each saved feed and reference of ``graph`` must hold: the graph's own input and output names."""
    spec = io_spec(cfg, graph)
    return tuple(n for n, _, _ in spec["inputs"]), tuple(n for n, _, _ in spec["outputs"])


def _array_kind(key: str) -> tuple[str, int]:
    """A saved array's dtype kinds and rank: ids and positions integer (B, T), logits float (B, T, V), each
    layer's state float (B, k-1, d)."""
    if state_layer(key) is not None:
        return "f", 3
    return {INPUT_IDS: ("iu", 2), POSITION_IDS: ("iu", 2), LOGITS: ("f", 3)}[key]


@dataclass
class SavedFeeds:
    """One graph's saved feeds: the inputs, eager fp32's outputs on them, and their labels (same length)."""

    graph: str              # prefill or step
    inputs: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]
    labels: list[str]


@dataclass
class SavedReferences:
    """A build folder's ``DIR/parity/`` as loaded and checked: the reference ``gamexport parity`` runs against."""

    folder: Path
    cfg: object             # the GAMConfig the folder's graphs were built for
    prefill: SavedFeeds
    step: SavedFeeds

    @property
    def graphs(self) -> tuple[SavedFeeds, SavedFeeds]:
        return self.prefill, self.step


def _check_references(pdir: Path, saved: SavedFeeds, cfg) -> None:
    """Inputs, reference outputs and labels of one graph agree in number and hold the arrays the check reads."""
    graph, feeds, refs, labels = saved.graph, saved.inputs, saved.outputs, saved.labels
    if not len(feeds) == len(refs) == len(labels):
        raise GamexportError(f"{pdir} holds {len(feeds)} {graph} inputs, {len(refs)} reference outputs and "
                             f"{len(labels)} labels; they must be as many", _REBUILD)
    need_in, need_out = reference_keys(cfg, graph)
    for i, (feed, ref) in enumerate(zip(feeds, refs)):
        for file, have, need in (("inputs", feed, need_in), ("outputs", ref, need_out)):
            where = pdir / f"{graph}_{file}.json"
            for key in need:
                if key not in have:
                    raise GamexportError(f"{where}: entry {i} has no {key}", _REBUILD)
                arr, (kind, rank) = have[key], _array_kind(key)
                if arr.dtype.kind not in kind or arr.ndim != rank:
                    raise GamexportError(f"{where}: entry {i}'s {key} is a {arr.ndim}-d {arr.dtype} array, expected "
                                         f"{rank}-d {'integer' if kind == 'iu' else 'float'}", _REBUILD)
        B, T = feed["input_ids"].shape   # a step graph's logits: the chunk's last position (T in older folders)
        if ref["logits"].shape[:2] not in {(B, T), *([(B, 1)] if graph == "step" else [])}:
            raise GamexportError(f"{pdir / f'{graph}_outputs.json'}: entry {i}'s logits {ref['logits'].shape} do "
                                 f"not match its input_ids {feed['input_ids'].shape}", _REBUILD)


def load_references(folder: Path, precisions: tuple[str, ...]) -> SavedReferences:
    """Check (manifest hashes, then shapes) and load a build folder's references for re-checking ``precisions``.

    Raises a one-line error when the folder has no references, lacks a precision's graphs, or when a file was
    changed since the build or does not hold what the re-check reads."""
    from gamexport.graph import read_graph_config
    from gamexport.layout import graph_file
    from gamexport.jsonfile import read_json
    from gamexport.manifest import verify
    from gamexport.polyjson import load_feeds, load_run_results

    pdir = folder / PARITY_DIR
    verify(folder, [f"{PARITY_DIR}/{n}" for n in REFERENCE_FILES]
           + [graph_file(k, p) for p in precisions for k in ("prefill", "step")])
    cfg, _ = read_graph_config(folder / "model.onnx")
    names = read_json(pdir / "feeds.json", schema=FEEDS_NAMES, fix=_REBUILD)
    saved = [SavedFeeds(graph, load_feeds(pdir / f"{graph}_inputs.json"),
                        load_run_results(pdir / f"{graph}_outputs.json"), names[graph])
             for graph in ("prefill", "step")]
    for graph in saved:
        _check_references(pdir, graph, cfg)
    return SavedReferences(folder, cfg, *saved)
