"""The analyses of docs/results.md: receptive field and multi-query associative recall (training/analysis.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gamexport.config import GAMConfig
from gamexport.model import build_model
from gamexport.training.analysis import (IGNORE, RecallTask, accuracy_within, recall_accuracy, recall_batch,
                                         receptive_field)


@pytest.mark.parametrize("n_layers,kernel", [(1, 3), (2, 3), (3, 4)])
def test_gam_receptive_field_is_one_plus_layers_times_kernel_minus_one(n_layers, kernel):
    cfg = GAMConfig(vocab_size=50, d_model=16, n_layers=n_layers, n_slots=8, kernel_size=kernel,
                    max_positions=48, dropout=0.0)
    model = build_model(cfg, seed=3)
    ids = np.random.default_rng(0).integers(0, 50, size=48)
    result = receptive_field(model, ids, positions=[0, 7, 20, 30])
    assert result["receptive_field"] == 1 + n_layers * (kernel - 1)
    # past the field the change is exactly zero (no token mixing outside the convolution), inside it is not
    reach = result["receptive_field"]
    assert all(v == 0.0 for v in result["max_change"][reach:])
    assert all(v > result["threshold"] for v in result["max_change"][:reach])


def test_receptive_field_of_a_model_that_sees_everything():
    """A toy causal model whose output t is the running mean of the embeddings: every later output moves."""

    class PrefixMean(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, 8)
            self.head = torch.nn.Linear(8, 20)

        def forward(self, idx, targets=None):
            h = self.embed(idx).cumsum(1) / torch.arange(1, idx.shape[1] + 1).view(1, -1, 1)
            return self.head(h), None

    torch.manual_seed(0)
    ids = np.arange(32) % 20
    result = receptive_field(PrefixMean(), ids, positions=[0, 4])
    assert result["receptive_field"] == 32             # offset 31 from position 0 still moves


def test_a_model_that_peeks_ahead_is_caught():
    class Peek(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

        def forward(self, idx, targets=None):
            return self.embed(idx.roll(-1, dims=1)), None      # output t reads token t + 1

    with pytest.raises(AssertionError, match="not causal"):
        receptive_field(Peek(), np.arange(10), positions=[5])


def test_recall_batches_have_one_right_answer_per_query():
    task = RecallTask(n_keys=16, n_values=8, n_noise=8, n_pairs=5, seq_len=40, max_distance=30)
    ids, targets, distance = recall_batch(task, 64, np.random.default_rng(1))
    assert ids.shape == targets.shape == distance.shape == (64, 40)
    queries = 0
    for b in range(64):
        for q in np.flatnonzero(targets[b] != IGNORE):
            queries += 1
            key, d = ids[b, q], distance[b, q]
            assert 0 <= key < task.n_keys and 1 <= d <= task.max_distance
            value_pos = q - d
            # the pair sits right before the value: key at q-d-1, value at q-d, and it is the key's only pair
            assert ids[b, value_pos - 1] == key and ids[b, value_pos] == targets[b, q]
            assert task.n_keys <= targets[b, q] < task.n_keys + task.n_values
            assert list(ids[b, :q]).count(key) == 1
        assert (ids[b] < task.vocab_size).all()
    assert queries >= 64 * 4                           # placement rarely runs out of room
    assert distance[targets == IGNORE].sum() == 0


def test_recall_accuracy_of_an_oracle_and_of_a_guesser():
    """An oracle that looks up the pair scores 1 at every distance; a constant guess scores about chance."""
    task = RecallTask(n_keys=8, n_values=8, n_noise=8, n_pairs=4, seq_len=32, max_distance=20)

    class Oracle(torch.nn.Module):
        def forward(self, idx, targets=None):
            B, T = idx.shape
            logits = torch.zeros(B, T, task.vocab_size)
            for b in range(B):
                for t in range(1, T):
                    earlier = (idx[b, :t - 1] == idx[b, t]).nonzero()
                    if idx[b, t] < task.n_keys and len(earlier):
                        logits[b, t, idx[b, earlier[0, 0] + 1]] = 1.0
            return logits, None

    class Constant(torch.nn.Module):
        def forward(self, idx, targets=None):
            logits = torch.zeros(*idx.shape, task.vocab_size)
            logits[..., task.n_keys] = 1.0
            return logits, None

    perfect = recall_accuracy(Oracle(), task, n_sequences=64)
    assert perfect["overall"] == 1.0 and accuracy_within(perfect, 1, 5) == 1.0
    guess = recall_accuracy(Constant(), task, n_sequences=512)
    assert abs(guess["overall"] - task.chance) < 0.05
