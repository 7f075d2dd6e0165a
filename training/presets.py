"""Training presets: a model shape plus the optimisation recipe that goes with it.

``paper`` is the paper's recipe (GPU-sized: 22.6M parameters, 5 epochs). ``small`` and ``tiny`` are for CPU:
``small`` trains in minutes on two cores, ``tiny`` in seconds (tests). ``demo`` is the recipe of the bundled
demo model (``gamexport/demo``). ``compare`` is the shape and recipe of the GAM / Transformer / Mamba comparison
(``gamexport.training.compare``). Model shapes come from ``gamexport.config.PRESETS``; the embedding size is then
set to the trained tokenizer's real vocabulary, which can be a little smaller than ``vocab_size`` on small data.

Every preset also trains the baselines (``--model transformer|mamba``): ``baselines.matched_config`` picks the
baseline width (a multiple of 8) whose parameter count is within ±5 % of the preset's GAM. That is why ``tiny``
is wider than ``gamexport.config.PRESETS["tiny"]`` (d 40 and 76 slots instead of d 32 and 16): at ~34k
parameters one width step of 8 moves a baseline's count by 30-45 %, and no Transformer or Mamba width lands
within ±5 %; at d 40 / 76 slots (~54k) both do, within 1 %, for every vocabulary from 258 to 300.

Initialisation. The reference code (and ``gamexport.model.GAM``) keeps PyTorch's default initialisation: the
position embedding is drawn from N(0, 1) while the token embedding — tied to the output head, so initialised as
a Linear layer — is uniform in ±1/√d (about 0.09 for d = 128). The position vector is then ~20 times longer than
the token vector, the blocks barely see which token they are at, and training stalls at the unigram loss: on
TinyStories the ``small`` model sat at 6.05 nats/token (the unigram entropy of its tokenizer) for 350 steps.
The CPU presets therefore re-draw both embeddings from N(0, 0.02) (GPT-2's choice) after building the model;
the loss then falls below the unigram level within ~80 steps. ``paper`` keeps the reference initialisation,
because it reproduces the paper's recipe (whose WikiText-2 perplexities, ~880, are close to a unigram model's).
"""

from __future__ import annotations

from dataclasses import dataclass

from gamexport.config import PRESETS, GAMConfig
from gamexport.errors import ConfigError


@dataclass(frozen=True)
class TrainPreset:
    name: str
    model: GAMConfig            # shape (vocab_size is replaced by the tokenizer's size)
    vocab_size: int             # tokenizer target size
    batch_size: int             # sequences per step
    seq_len: int                # T: tokens per sequence (chunks of T+1 hold input and target)
    epochs: int                 # passes over the training chunks (unless max_steps says otherwise)
    lr: float = 3e-4            # peak learning rate, reached after warmup_steps, then cosine to 0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1   # AdamW, on every parameter (as the paper)
    warmup_steps: int = 100
    grad_clip: float = 1.0
    embedding_init_std: float | None = 0.02   # re-draw token and position embeddings from N(0, std); None keeps
                                # the reference code's PyTorch defaults (see the module docstring)
    eval_every: int = 200       # steps between validation passes (and one at the end)
    checkpoint_every: int = 500 # steps between checkpoints (and one at the end)
    description: str = ""

    # seq_len = max_positions in every preset: a position the training sequences never reach keeps its random
    # initial embedding, and generation past it would read noise.

    def __post_init__(self) -> None:
        if self.seq_len > self.model.max_positions:
            raise ConfigError(f"preset {self.name}: seq_len {self.seq_len} exceeds the model's "
                              f"{self.model.max_positions} positions", "shorten seq_len")


TRAIN_PRESETS: dict[str, TrainPreset] = {
    "paper": TrainPreset(
        "paper", PRESETS["paper"], vocab_size=10_000, batch_size=32, seq_len=256, epochs=5,
        lr=3e-4, warmup_steps=100, embedding_init_std=None, eval_every=500, checkpoint_every=500,
        description="the paper's recipe: d 512, L 6, S 512, batch 32 × 256, AdamW 3e-4, 5 epochs (a GPU job)"),
    "small": TrainPreset(
        "small", PRESETS["small"], vocab_size=4096, batch_size=8, seq_len=256, epochs=2,
        lr=1e-3, warmup_steps=100, eval_every=200, checkpoint_every=500,
        description="d 128, L 4, S 128, batch 8 × 256, AdamW 1e-3: a few minutes per epoch of TinyStories on CPU"),
    "demo": TrainPreset(
        "demo", PRESETS["small"], vocab_size=2048, batch_size=8, seq_len=256, epochs=8,
        lr=5e-3, warmup_steps=100, eval_every=250, checkpoint_every=500,
        description="the bundled demo model (gamexport/demo): the small shape with a 2,048-token vocabulary, "
                    "8 epochs of the TinyStories subset in about 12 minutes on 2 CPU cores"),
    "tiny": TrainPreset(
        "tiny", PRESETS["tiny"].replace(d_model=40, n_slots=76), vocab_size=300, batch_size=4, seq_len=64,
        epochs=1, lr=3e-3, warmup_steps=5, eval_every=10, checkpoint_every=10,
        description="d 40, L 2, S 76: every code path in seconds (tests); sized so the baselines can match it"),
    "compare": TrainPreset(
        "compare", PRESETS["small"].replace(d_model=160, n_slots=160, max_positions=128), vocab_size=4096,
        batch_size=16, seq_len=128, epochs=1, lr=1e-3, warmup_steps=50, eval_every=200, checkpoint_every=200,
        description="the GAM / Transformer / Mamba comparison (gamexport.training.compare): d 160, L 4, S 160, "
                    "batch 16 × 128, AdamW 1e-3. d 160 rather than 128: at d 128 no Transformer width that "
                    "8 heads divide lands within ±5 % of GAM's parameters (120: −5.1 %, 128: +5.1 %)"),
}


def train_preset(name: str) -> TrainPreset:
    try:
        return TRAIN_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown training preset {name!r}",
                          f"choose one of: {', '.join(TRAIN_PRESETS)}") from None
