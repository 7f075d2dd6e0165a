"""Every size and count the command line accepts, with its bound and the reason for it — in one place.

The CLI declares its options from these constants (typer's ``min``/``max``, so a value outside the range is one
``error:`` line before any work starts, and ``--help`` shows the range); the library functions that take the same
values (``SamplingConfig``, the bench options, the tokenizer trainer) check them again with the same constants,
so the Python API is bounded too. Only the standard library is imported: ``gamexport --help`` reads this module.

| value | range | why |
|---|---|---|
| ``--threads/-j`` | 1 .. 4 × usable CPUs | more threads than cores only slow ONNX Runtime (its workers spin); ``-j 10000`` ran for minutes and ``-j 2**31`` overflowed inside ONNX Runtime |
| ``--max-new-tokens`` | 0 .. 2**20 | generation also stops at the model's P positions; no model has a million |
| ``--top-k`` | 0 .. 2**20 | as the vocabulary; above V it is no filter |
| ``--temperature`` | 0, or 1e-3 .. 100 | 0 is greedy; below 1e-3 sampling is greedy in effect (a logit gap of 0.05 becomes e^-50) and a subnormal T overflows logits/T to inf (1e-320 sampled garbage) — refused, not silently made greedy; at 100 typical logits (a range of ~20) give a nearly flat distribution |
| ``--seed`` | 0 .. 2**32 − 1 | NumPy's seed range (``np.random.seed``), which every generator used here accepts; a negative seed raised inside NumPy |
| ``--max-steps``, ``--eval-every``, ``--checkpoint-every`` | 1 .. 10**9 | a billion optimizer steps is weeks on a GPU; ``2**70`` ran on forever |
| ``--vocab-size`` | 258 .. 2**20 | 256 bytes + 2 specials; the tokenizer library allocates ~71 bytes per id up front and aborts the process (SIGABRT) when that fails (10**9 asked for 71 GB); 2**20 is 4× the largest common vocabularies |
| ``bench --min-t/--max-t`` | 1 .. 16384 | twice the paper's 8192; the Transformer block's attention scores take up to H·T²·4 B (8.6 GB at the bound) |
| TensorRT profile batch (``--max BxT``) | 1 .. 1024 | the engine allocates for the max shape: logits alone are B·T·V·4 bytes (1024 × 256 × 32k ≈ 34 GB); T is bounded by the model's P |
| training text read at once | ≤ 2 GiB per file | it is held in memory several times (text, documents, tokens) |
"""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


MAX_THREADS = 4 * usable_cpus()
MAX_NEW_TOKENS = 2**20
MAX_TOP_K = 2**20
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**32 - 1
MAX_STEPS = 10**9
MIN_VOCAB = 258
MAX_VOCAB = 2**20
MAX_SCALING_T = 16384
MAX_PROFILE_BATCH = 1024
MAX_TEXT_BYTES = 2 * 1024**3
#: A tokenizer.json of a 2^20-token vocabulary with its merges is tens of MB; a file past this is not one.
MAX_TOKENIZER_BYTES = 256 * 1024**2


def check_range(name: str, value, lo, hi) -> None:
    """Raise ``InputError`` (one line: the name, the value and the range) unless ``lo <= value <= hi``."""
    from .errors import InputError

    if not lo <= value <= hi:   # also refuses NaN
        raise InputError(f"{name} {value} is outside {lo}..{hi}", f"pass {name} between {lo} and {hi}")


def check_temperature(value: float) -> None:
    """0 (greedy) or MIN_TEMPERATURE..MAX_TEMPERATURE; a tiny positive value overflows logits/T into garbage."""
    from .errors import InputError

    if value == 0:
        return
    if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise InputError(f"temperature {value} is outside 0 or {MIN_TEMPERATURE}..{MAX_TEMPERATURE:g}",
                         "use 0 for greedy decoding, or a temperature between 0.001 and 100")
