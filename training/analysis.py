"""Two things the paper does not measure: how far a trained GAM sees, and whether it can recall what it saw.

Receptive field. Only GAM's causal convolution mixes tokens (the memory read and the gate are per token), so the
logits at position t can depend on the inputs t − L·(k−1) … t and on nothing earlier: 1 + L·(k−1) tokens (9 for
the demo model's 4 layers and kernel 3). ``receptive_field`` measures it on a trained model instead of assuming
it: replace one input token, run the model again, and record which outputs moved and by how much. The same
measurement on the Transformer shows every later position moving.

Associative recall. A multi-query associative-recall task (MQAR, as in the Zoology study of efficient language
models): the sequence holds key–value pairs among noise, each key comes back later as a query, and the model must
answer with the value that followed it. A query ``distance`` tokens after its value is answerable only if the
model's receptive field reaches back that far. GAM's memory bank is a learned constant — it cannot store the
pairs of one sequence — so beyond 1 + L·(k−1) tokens GAM should sit at chance (1 / number of values); the
Transformer's attention can reach any earlier token. ``recall_study`` trains both, at the same size, on the same
batches, and reports accuracy per distance.

Both functions take any language model with GAM's contract: ``model(idx) -> (logits, loss)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

IGNORE = -100          # the target of positions that are not scored (F.cross_entropy's default ignore_index)


# ---- receptive field -------------------------------------------------------------------------------------------

@torch.inference_mode()
def receptive_field(model: nn.Module, ids: np.ndarray, positions: list[int], seed: int = 0,
                    rel_tol: float = 1e-5) -> dict[str, Any]:
    """Perturb one input token at each of ``positions`` and measure how far the change travels.

    ids: (T,) token ids of real text. For every perturbed position p the token is replaced by a random other id
    and the largest absolute logit change is recorded at every output t ≥ p, as a function of the offset t − p.
    An output "moved" when its change exceeds ``rel_tol`` × the logits' typical size (the float32 noise of
    running the same input twice is zero here: eval mode, same kernels, same shapes). Returns per offset the
    median and maximum change over the perturbed positions, and the measured receptive field: the largest
    offset that moved for any p, plus one (the output at p itself).
    """
    model.eval()
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64)).unsqueeze(0)
    T = x.shape[1]
    base, _ = model(x)
    scale = float(base.abs().mean())
    vocab = base.shape[-1]
    longest = T - min(positions)
    changes = np.full((len(positions), longest), np.nan)
    for row, p in enumerate(positions):
        if not 0 <= p < T:
            raise ValueError(f"position {p} is outside the sequence of {T} tokens")
        y = x.clone()
        y[0, p] = int((int(x[0, p]) + 1 + rng.integers(vocab - 1)) % vocab)     # any id but the original
        moved, _ = model(y)
        delta = (moved[0, p:] - base[0, p:]).abs().amax(dim=-1).double().numpy()   # (T − p,)
        changes[row, :len(delta)] = delta
        before = (moved[0, :p] - base[0, :p]).abs().max().item() if p else 0.0
        if before != 0.0:
            raise AssertionError(f"an output before the perturbed position {p} moved by {before}: not causal")
    threshold = rel_tol * scale
    moved_any = np.nanmax(changes, axis=0) > threshold
    reach = int(np.flatnonzero(moved_any).max()) + 1 if moved_any.any() else 0
    with np.errstate(all="ignore"):
        median = np.nanmedian(changes, axis=0)
        largest = np.nanmax(changes, axis=0)
    return {"positions": list(map(int, positions)), "threshold": threshold, "logit_scale": scale,
            "receptive_field": reach,
            "median_change": [float(v) for v in median], "max_change": [float(v) for v in largest]}


# ---- multi-query associative recall ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RecallTask:
    """Token layout: keys [0, n_keys), values [n_keys, n_keys + n_values), noise after them."""

    n_keys: int = 32
    n_values: int = 32
    n_noise: int = 32
    n_pairs: int = 6             # key–value pairs per sequence, each queried once
    seq_len: int = 64
    max_distance: int = 48       # tokens from a value to its query are drawn uniformly in [1, max_distance]

    @property
    def vocab_size(self) -> int:
        return self.n_keys + self.n_values + self.n_noise

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values


def recall_batch(task: RecallTask, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """ids (B, T); targets (B, T): the value at each query position, IGNORE elsewhere; distance (B, T): tokens
    from the pair's value to the query at query positions, 0 elsewhere.

    Pairs and queries are placed at random free positions over a background of noise tokens; each key appears
    at most once as a pair in a sequence, so every query has exactly one right answer.
    """
    T = task.seq_len
    ids = rng.integers(task.n_keys + task.n_values, task.vocab_size, size=(batch, T))
    targets = np.full((batch, T), IGNORE, dtype=np.int64)
    distance = np.zeros((batch, T), dtype=np.int64)
    for b in range(batch):
        free = np.ones(T, dtype=bool)
        keys = rng.choice(task.n_keys, size=task.n_pairs, replace=False)
        for key in keys:
            for _ in range(100):
                d = int(rng.integers(1, task.max_distance + 1))
                p = int(rng.integers(0, T - d - 1))        # key at p, value at p + 1, query at p + 1 + d < T
                q = p + 1 + d
                if free[p] and free[p + 1] and free[q]:
                    break
            else:
                continue                                   # no room left for this pair: fewer pairs this row
            value = task.n_keys + int(rng.integers(task.n_values))
            ids[b, p], ids[b, p + 1], ids[b, q] = key, value, key
            free[[p, p + 1, q]] = False
            targets[b, q], distance[b, q] = value, d
    return ids, targets, distance


def train_recall(model: nn.Module, task: RecallTask, steps: int, batch: int = 64, lr: float = 3e-3,
                 seed: int = 0, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW on fresh MQAR batches (loss on query positions only); returns the loss of every step."""
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:        # short warm-up, then cosine to 10 %
            warm = min(1.0, (step + 1) / 50)
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        ids, targets, _ = recall_batch(task, batch, rng)
        _, loss = model(torch.from_numpy(ids), torch.from_numpy(targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


@torch.inference_mode()
def recall_accuracy(model: nn.Module, task: RecallTask, n_sequences: int = 2048, seed: int = 12345
                    ) -> dict[str, Any]:
    """Accuracy of the argmax over the value tokens at each query, per distance 1 … max_distance."""
    model.eval()
    rng = np.random.default_rng(seed)
    hits = np.zeros(task.max_distance + 1)
    counts = np.zeros(task.max_distance + 1)
    for start in range(0, n_sequences, 256):
        ids, targets, distance = recall_batch(task, min(256, n_sequences - start), rng)
        logits, _ = model(torch.from_numpy(ids))
        values = logits[..., task.n_keys:task.n_keys + task.n_values].argmax(-1).numpy() + task.n_keys
        scored = targets != IGNORE
        np.add.at(counts, distance[scored], 1)
        np.add.at(hits, distance[scored], (values == targets)[scored])
    with np.errstate(invalid="ignore"):
        accuracy = hits / counts
    return {"distance": list(range(1, task.max_distance + 1)),
            "accuracy": [None if math.isnan(a) else float(a) for a in accuracy[1:]],
            "queries": [int(c) for c in counts[1:]],
            "overall": float(hits.sum() / counts.sum())}


def accuracy_within(result: dict[str, Any], low: int, high: int) -> float:
    """Query-weighted accuracy over distances low … high (inclusive)."""
    hits = count = 0.0
    for d, acc, n in zip(result["distance"], result["accuracy"], result["queries"]):
        if low <= d <= high and n:
            hits += acc * n
            count += n
    return hits / count if count else float("nan")


def recall_study(kinds: tuple[str, ...] = ("gam", "transformer"), task: RecallTask = RecallTask(),
                 d_model: int = 64, n_layers: int = 2, steps: int = 1500, batch: int = 64, lr: float = 3e-3,
                 seed: int = 0, log: Callable[[str], None] | None = None, sequences: int = 2048) -> dict[str, Any]:
    """Train each kind at matched size on the same MQAR batches and measure accuracy per distance, on
    ``sequences`` held-out sequences.

    The GAM has ``d_model``, ``n_layers``, kernel 3 and as many memory slots as the task has tokens; the
    Transformer's width is matched to its parameter count (``baselines.matched_config``).
    """
    from gamexport.config import GAMConfig

    from .baselines import build_lm

    gam_cfg = GAMConfig(vocab_size=task.vocab_size, d_model=d_model, n_layers=n_layers, n_slots=task.vocab_size,
                        kernel_size=3, max_positions=task.seq_len, dropout=0.0)
    out: dict[str, Any] = {"task": asdict(task), "chance": task.chance, "steps": steps, "batch": batch,
                           "lr": lr, "seed": seed, "sequences": sequences,
                           "gam_receptive_field": gam_cfg.receptive_field, "models": {}}
    for kind in kinds:
        model = build_lm(kind, gam_cfg, seed=seed)
        started = time.perf_counter()
        every = max(1, steps // 5)

        def report(step: int, loss: float, kind=kind) -> None:
            if log is not None and ((step + 1) % every == 0 or step == 0):
                log(f"recall {kind}: step {step + 1}/{steps} loss {loss:.3f}")

        losses = train_recall(model, task, steps, batch, lr, seed, report)
        result = recall_accuracy(model, task, n_sequences=sequences)
        result.update(params=sum(p.numel() for p in model.parameters()), d_model=model.config.d_model,
                      train_s=round(time.perf_counter() - started, 1), final_loss=float(np.mean(losses[-20:])))
        out["models"][kind] = result
    return out
