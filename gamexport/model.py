"""The GAM language model in PyTorch, as the paper's reference code computes it (arXiv 2509.00605).

Parameter names are the reference ``GAM_Model``'s state_dict names, so its ``torch.save(model.state_dict())``
files load unchanged. Beyond the reference, every block can take and return its streaming state explicitly:
the last k-1 LayerNorm-1 outputs, the only thing a later token needs from earlier ones (no KV cache).

Shapes: B batch, T tokens in this call, d model width, S memory slots, k conv kernel, L layers, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GAMConfig


class GAMBlock(nn.Module):
    """Pre-LN residual block: causal depthwise conv ⊕ associative memory read, gated; then a GELU FFN."""

    def __init__(self, cfg: GAMConfig):
        super().__init__()
        d = cfg.d_model
        self.k = cfg.kernel_size
        self.ln1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        # Depthwise conv; the causal left padding is applied in forward() from the streaming state.
        self.causal_conv = nn.Conv1d(d, d, cfg.kernel_size, groups=d, bias=True)
        self.memory_bank = nn.Parameter(torch.empty(cfg.n_slots, d))
        nn.init.xavier_uniform_(self.memory_bank)
        self.gate = nn.Linear(d, 2 * d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(cfg.dropout))
        self.ln2 = nn.LayerNorm(d, eps=cfg.ln_eps)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, T, d); past: (B, k-1, d) = LN1 outputs of the k-1 positions before this call (zeros at start)
        h = self.ln1(x)                                                  # (B, T, d)
        hcat = torch.cat([past, h], dim=1)                               # (B, k-1+T, d)
        local = self.causal_conv(hcat.transpose(1, 2)).transpose(1, 2)   # (B, T, d)
        scores = h @ self.memory_bank.T                                  # (B, T, S), no 1/sqrt(d)
        glob = F.softmax(scores, dim=-1) @ self.memory_bank              # (B, T, d)
        g_local, g_global = self.gate(h).chunk(2, dim=-1)                # 2 × (B, T, d)
        x = x + torch.sigmoid(g_local) * local + torch.sigmoid(g_global) * glob
        x = x + self.ffn(self.ln2(x))                                    # (B, T, d)
        present = hcat[:, -(self.k - 1):, :]                             # (B, k-1, d)
        return x, present


class TiedLM(nn.Module):
    """The language-model shell GAM shares with the paper's Transformer baseline (``training.baselines``): token +
    learned position embeddings → dropout → ``cfg.n_layers`` blocks from ``block()`` → final LN → a head tied to the
    token embedding, as the reference code does. ``cfg`` has vocab_size, d_model, max_positions, n_layers, dropout
    and ln_eps."""

    def __init__(self, cfg, block):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.token_embedding = nn.Embedding(cfg.vocab_size, d)
        self.pos_embedding = nn.Embedding(cfg.max_positions, d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(block() for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.token_embedding.weight = self.head.weight  # tied


class GAM(TiedLM):
    """GAM language model: token + learned position embeddings → L blocks → final LN → tied head."""

    def __init__(self, cfg: GAMConfig):
        super().__init__(cfg, lambda: GAMBlock(cfg))

    def empty_state(self, batch: int) -> torch.Tensor:
        """Streaming state before any token: zeros of shape (B, L, k-1, d)."""
        c = self.config
        return torch.zeros(batch, c.n_layers, c.state_len, c.d_model,
                           dtype=self.ln_f.weight.dtype, device=self.ln_f.weight.device)

    def step(self, idx: torch.Tensor, position_ids: torch.Tensor | int,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Consume a chunk of tokens after earlier ones: returns logits (B, C, V) and the new state.

        idx: (B, C) token ids; position_ids: (B, C) position of every token, or (B, 1) the position of idx[:, 0]
        (or an int for all rows); state: (B, L, k-1, d) the state returned after the earlier tokens
        (``empty_state`` at the start).
        """
        B, C = idx.shape
        if isinstance(position_ids, int):
            position_ids = torch.full((B, 1), position_ids, dtype=torch.long, device=idx.device)
        if position_ids.shape[-1] == C:
            pos = position_ids.expand(B, C)                                          # (B, C)
        else:
            pos = position_ids + torch.arange(C, device=idx.device).unsqueeze(0)    # (B, C)
        x = self.dropout(self.token_embedding(idx) + self.pos_embedding(pos))      # (B, C, d)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, state[:, i])                                     # (B, C, d), (B, k-1, d)
            presents.append(present)
        logits = self.head(self.ln_f(x))                                            # (B, C, V)
        return logits, torch.stack(presents, dim=1)                                 # (B, L, k-1, d)

    def prefill(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk from the zero state at position 0: logits (B, T, V) and the state after T tokens."""
        return self.step(idx, 0, self.empty_state(idx.shape[0]))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """As the reference ``GAM_Model.forward``: (logits, loss or None)."""
        logits, _ = self.prefill(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied tensor once


def build_model(cfg: GAMConfig, state_dict=None, seed: int | None = None) -> GAM:
    """A GAM in eval mode: with the given weights (numpy or torch tensors, reference names), else seeded init."""
    if seed is not None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        model = GAM(cfg)
    finally:
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    if state_dict is not None:
        tensors = {k: torch.as_tensor(v) for k, v in state_dict.items()}
        tensors.setdefault("head.weight", tensors.get("token_embedding.weight"))
        tensors.setdefault("token_embedding.weight", tensors["head.weight"])
        model.load_state_dict(tensors, strict=True)
    return model.eval()


def state_dict_numpy(model: GAM) -> dict:
    """The model's weights as float32 numpy arrays, tied pair stored once as ``token_embedding.weight``."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "head.weight":
            continue
        out[name] = tensor.detach().to(torch.float32).cpu().numpy().copy()
    return out
