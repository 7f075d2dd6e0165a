"""FLOP and byte arithmetic: what one token, one block or one decode step costs, counted from the config.

Every fraction the bench and the build report is achieved ÷ limit, and "achieved" is one of these counts divided
by a measured time; tests/test_bench.py checks them by hand and against ``torch.utils.flop_counter``.
"""

from __future__ import annotations

from gamexport.bench.settings import SCALING_D, SCALING_KERNEL, SCALING_SLOTS
from gamexport import layout
from gamexport.config import GAMConfig


#: Bytes per stored element of the weights a MatMul reads, per precision.
WEIGHT_BYTES = layout.WEIGHT_BYTES


def flops_per_token(cfg: GAMConfig) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) one token costs in the GAM model, by term, and their total.

    Per layer: memory read 4·S·d (``h·Mᵀ`` and ``softmax·M``), gate 4·d² (``Linear(d, 2d)``), FFN 16·d²
    (``d→4d→d``), depthwise conv 2·k·d; once: the tied head 2·V·d. LayerNorm, softmax, sigmoid, GELU, biases and
    the embedding gathers are not counted. The graphs (and eager PyTorch) compute the head at every position.
    """
    d, L, S, k, V = cfg.d_model, cfg.n_layers, cfg.n_slots, cfg.kernel_size, cfg.vocab_size
    terms = {"memory_read": L * 4 * S * d, "gate": L * 4 * d * d, "ffn": L * 16 * d * d, "conv": L * 2 * k * d,
             "head": 2 * V * d}
    return {**terms, "total": sum(terms.values())}


def prefill_flops(cfg: GAMConfig, batch: int, seq_len: int, head_positions: str = "all") -> int:
    """FLOPs of a prefill of ``batch`` × ``seq_len`` tokens: every position's blocks, and the tied head at every
    position (``head_positions`` "all": the prefill graph, scoring) or at the last one only ("last": what
    generation needs — the step graph fed the prompt as one chunk; the useful FLOPs whatever a runtime computes)."""
    per = flops_per_token(cfg)
    heads = seq_len if head_positions == "all" else 1
    return batch * (seq_len * (per["total"] - per["head"]) + heads * per["head"])


def gam_block_flops(T: int, d: int = SCALING_D, slots: int = SCALING_SLOTS, kernel: int = SCALING_KERNEL) -> int:
    """Forward FLOPs of one GAM block over T tokens: T·(4·S·d + 20·d² + 2·k·d)."""
    return T * (4 * slots * d + 20 * d * d + 2 * kernel * d)


def transformer_block_flops(T: int, d: int = SCALING_D) -> int:
    """Forward FLOPs of one pre-LN Transformer block over T tokens: T·(24·d² + 2·T·d).

    24·d²: QKV 6·d², output projection 2·d², MLP 16·d². Causal attention: ``QKᵀ`` and ``AV`` over the T/2 keys a
    query sees on average, 2 × 2·d·T/2 = 2·T·d per token (the count behind GAM's 2.33× FLOP advantage at T = 8192).
    """
    return T * (24 * d * d + 2 * T * d)


def matmul_weight_elements(cfg: GAMConfig) -> int:
    """Elements of the weights the model multiplies with: per layer M (S·d), gate (2·d²), FFN (8·d²); the head."""
    d = cfg.d_model
    return cfg.n_layers * (cfg.n_slots * d + 2 * d * d + 8 * d * d) + cfg.vocab_size * d


def weight_bytes_per_step(cfg: GAMConfig, precision: str) -> int:
    """Bytes of weights one decode step reads: every parameter once, except the P−1 position rows it does not use.

    The MatMul weights (memory bank, gate, FFN, tied embedding/head) count at the precision's storage size (plus
    one fp32 scale per output channel for INT8; INT4's block scales are in its ``WEIGHT_BYTES``, and its head's
    8-bit blocks are counted as 4-bit ones, so an INT4 row's limit is, if anything, too fast); LayerNorms, biases
    and the conv stay fp32. A graph that reads a weight twice (e.g. M and a folded Mᵀ) or in a wider type than it
    stores is measured against this, so the duplication shows as a lower fraction.
    """
    d, L = cfg.d_model, cfg.n_layers
    used = cfg.n_params() - (cfg.max_positions - 1) * d
    mm = matmul_weight_elements(cfg)
    nbytes = (used - mm) * 4 + mm * WEIGHT_BYTES[precision]
    if precision.startswith("int8"):
        nbytes += 4 * (L * (cfg.n_slots + d + 2 * d + 4 * d + d) + cfg.vocab_size)
    return int(nbytes)


def weight_matmul_shapes(cfg: GAMConfig) -> list[tuple[int, int]]:
    """[K, N] of every weight MatMul of one token's forward pass, as the graphs run them: per layer h·Mᵀ (d, S),
    softmax·M (S, d), gate (d, 2d), FFN (d, 4d) and (4d, d); then the tied head (d, V)."""
    d, S = cfg.d_model, cfg.n_slots
    return [*[(K, N) for _ in range(cfg.n_layers) for K, N in ((d, S), (S, d), (d, 2 * d), (d, 4 * d), (4 * d, d))],
            (d, cfg.vocab_size)]
