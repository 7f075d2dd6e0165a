"""An independent emulation, in PyTorch, of the half-precision plan the graph builder writes.

It follows the plan's rules (``HALF_WEIGHTS`` in half precision, MatMuls in half, LayerNorm / Softmax /
sigmoid gates / residual / conv in fp32) with torch's own half and bfloat16 arithmetic, so a graph can be checked
to compute *that* plan: a graph that silently stayed fp32 is further from the emulation than the emulation
tolerance, and a graph that dropped a fp32 island drifts too.

Two uses: on the CPU, against ONNX Runtime's CPU provider (which computes half MatMuls in fp32, so the build
compares it with fp32 math on half-rounded weights, :func:`round_weights`); and on CUDA, against runtimes that
really multiply in fp16/bf16 (TensorRT, ONNX Runtime's CUDA provider), where :func:`half_plan_metrics` decides
whether a runtime's logits are nearer the emulated half plan or fp32 compute on the same half-rounded weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import numpy as np

from ..config import GAMConfig
from .builder import is_half_weight


@contextmanager
def _cuda_math(torch, device) -> Iterator[None]:
    """On CUDA: fp32 MatMuls and convolutions in fp32 (TF32 off in cuBLAS and cuDNN) and half MatMuls reduced in
    fp32 (no reduced-precision split-K reductions), as the plan says; the settings are restored afterwards.
    Nothing to change on the CPU."""
    if torch.device(device).type != "cuda":
        yield
        return
    # Process-wide flags (cuBLAS and cuDNN — the conv goes through cuDNN): not safe while another thread runs CUDA.
    flags = [(torch.backends.cuda.matmul, n) for n in ("allow_tf32", "allow_fp16_reduced_precision_reduction",
                                                        "allow_bf16_reduced_precision_reduction")]
    flags.append((torch.backends.cudnn, "allow_tf32"))
    saved = [(obj, n, getattr(obj, n)) for obj, n in flags if hasattr(obj, n)]
    try:
        for obj, n, _ in saved:
            setattr(obj, n, False)
        yield
    finally:
        for obj, n, value in saved:
            setattr(obj, n, value)


def emulate_logits(weights: Mapping[str, np.ndarray], cfg: GAMConfig, ids: np.ndarray,
                   precision: str, device: str = "cpu") -> np.ndarray:
    """Logits (B, T, V) float32 of ``ids`` (B, T) from position 0 under the fp16/bf16 plan (or fp32), computed on
    ``device`` ("cpu" or "cuda[:i]"; on CUDA with TF32 and reduced-precision reductions off)."""
    import torch
    import torch.nn.functional as F

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    W = {}
    for name, value in weights.items():
        t = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).to(device)
        W[name] = t.to(dt) if is_half_weight(name) else t
    idx = torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(device)
    B, T = idx.shape
    d, k, eps = cfg.d_model, cfg.kernel_size, cfg.ln_eps
    with torch.no_grad(), _cuda_math(torch, device):
        x = W["token_embedding.weight"][idx].float() + W["pos_embedding.weight"][:T]
        for i in range(cfg.n_layers):
            p = f"blocks.{i}."
            h = F.layer_norm(x, (d,), W[p + "ln1.weight"], W[p + "ln1.bias"], eps)          # fp32
            padded = F.pad(h.transpose(1, 2), (k - 1, 0))
            local = F.conv1d(padded, W[p + "causal_conv.weight"], W[p + "causal_conv.bias"],
                             groups=d).transpose(1, 2)                                       # fp32
            hm = h.to(dt)
            M = W[p + "memory_bank"]
            weights_ = torch.softmax((hm @ M.T).float(), dim=-1)                            # fp32 softmax
            glob = (weights_.to(dt) @ M).float()
            g = (hm @ W[p + "gate.weight"].T + W[p + "gate.bias"]).float()
            x = x + torch.sigmoid(g[..., :d]) * local + torch.sigmoid(g[..., d:]) * glob
            hn = F.layer_norm(x, (d,), W[p + "ln2.weight"], W[p + "ln2.bias"], eps).to(dt)
            u = F.gelu(hn @ W[p + "ffn.0.weight"].T + W[p + "ffn.0.bias"])
            x = x + (u @ W[p + "ffn.2.weight"].T + W[p + "ffn.2.bias"]).float()
        xf = F.layer_norm(x, (d,), W["ln_f.weight"], W["ln_f.bias"], eps).to(dt)
        return (xf @ W["token_embedding.weight"].T).float().cpu().numpy()


def round_weights(weights: Mapping[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    """The fp32 weights a half-precision graph effectively holds: HALF_WEIGHTS rounded to fp16/bf16 and back.

    Running the fp32 model on these emulates "half-precision weights, fp32 compute" — what ONNX Runtime's CPU
    provider does with an fp16 graph (it inserts casts around ops it has no fp16 kernel for).
    """
    import ml_dtypes  # a dependency of onnx

    half = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}[precision]
    return {k: (v.astype(half).astype(np.float32) if is_half_weight(k) else v) for k, v in weights.items()}


# ---- runtimes that really compute in half precision ---------------------------------------------------------
def emulation_device() -> tuple[str | None, str]:
    """Where the half plan is emulated for runtimes that multiply in fp16/bf16: ("cuda", the GPU), or (None, why
    not). CUDA, because that is where such runtimes run and where torch's half MatMuls are the GPU's own."""
    try:
        import torch  # noqa: F401  (the emulation is eager PyTorch: a GPU only the driver sees is not enough)
    except ImportError:
        return None, "torch is not installed"
    from ..device import cuda_status

    usable, why = cuda_status()
    return ("cuda" if usable else None), why


def half_plan_references(weights: Mapping[str, np.ndarray], cfg: GAMConfig, ids: np.ndarray, precision: str,
                         device: str) -> tuple[np.ndarray, np.ndarray]:
    """(the half plan, fp32 compute on the same half-rounded weights): the two hypotheses about what a runtime that
    says it multiplies in ``precision`` computes."""
    plan = emulate_logits(weights, cfg, ids, precision, device)
    fp32_compute = emulate_logits(round_weights(weights, precision), cfg, ids, "fp32", device)
    return plan, fp32_compute


#: RMS summation-order noise of fp32 logits, relative to max(1, max|logit|), that one fp32 implementation may show
#: against another: measured 5e-8 between ONNX Runtime and this emulation (tiny preset, 64 tokens); 1e-6 leaves 20×.
FP32_NOISE_RMS = 1e-6
#: the half plan and fp32 compute must differ by this many times the noise before the gate means anything
PLAN_GAP_FACTOR = 10
#: a runtime that multiplies in half sits at least this fraction of the plan's own distance from fp32 compute
HALF_DISPLACEMENT = 0.25


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.sqrt(np.mean(diff * diff)))


def half_plan_metrics(test: np.ndarray, plan: np.ndarray, fp32_compute: np.ndarray, precision: str) -> dict[str, Any]:
    """A parity row's metrics for logits ``test`` of a runtime that says it multiplies in ``precision``, against the
    emulated ``plan`` — gated so that a runtime silently computing in fp32 fails.

    Let gap = RMS(plan − fp32_compute): how far the half plan moves the logits from fp32 compute on the same
    half-rounded weights. No tolerance on |test − plan| can tell half compute from fp32 compute: a real half
    engine rounds at its own points (fused epilogues, its own summation order), and that rounding noise is as
    large as the gap itself. What separates them is the distance from fp32 compute. On the tiny preset, half
    arithmetic arranged four ways (the plan, fused bias/GELU epilogues, only MatMul inputs rounded, fp32 islands
    dropped) lies 0.66–0.97 gap from fp32 compute and 1.0–1.25 gap from the plan; fp32 compute with fp32 noise
    lies 0.001 gap from it. So the gate is: at least HALF_DISPLACEMENT × gap (RMS) from fp32 compute (else
    "fp32-compute"), and within the precision's KL / top-1 gate of the plan. It cannot tell one arrangement of
    half arithmetic from another (a dropped fp32 island): the graph's structural check covers that.

    The row is gated only when gap > PLAN_GAP_FACTOR × FP32_NOISE_RMS × max(1, max|plan|), so that fp32 noise
    cannot reach the threshold; below that nothing can tell the two apart on these inputs, and the row is
    informational (``gated: false``) and says so.
    """
    from ..parity import compare_logits, tolerance

    metrics = compare_logits(plan, test, tolerance(precision))
    if "error" in metrics:
        return metrics
    gap = _rms(plan, fp32_compute)
    floor = PLAN_GAP_FACTOR * FP32_NOISE_RMS * max(1.0, float(np.abs(plan).max()))
    to_plan, to_fp32 = _rms(test, plan), _rms(test, fp32_compute)
    metrics.update(plan_rms_diff=to_plan, fp32_compute_rms_diff=to_fp32, plan_gap_rms=gap, plan_gap_floor=floor,
                   fp32_compute_rms_limit=HALF_DISPLACEMENT * gap)
    if gap <= floor:
        metrics.update(gated=False, passed=True, failed_checks=[])
        metrics["tolerances"]["reason"] = (
            f"informational: on these inputs the {precision} plan and fp32 compute on {precision}-rounded weights "
            f"differ by {gap:.2g} RMS, not more than {PLAN_GAP_FACTOR}× fp32 summation noise ({floor:.2g}), so no "
            "tolerance can tell a graph computing in fp32 from one computing the plan")
        return metrics
    metrics["tolerances"]["reason"] = (
        f"must compute in {precision}: at least {HALF_DISPLACEMENT:g}× the plan's own distance ({gap:.2g} RMS) from "
        f"fp32 compute on the same {precision} weights, and within the {precision} gate of the emulated plan "
        f"(eager PyTorch: {precision} weights and MatMuls, fp32 LayerNorm/Softmax/gates/conv)")
    if not to_fp32 >= HALF_DISPLACEMENT * gap:
        metrics["failed_checks"] = sorted([*metrics["failed_checks"], "fp32-compute"])
        metrics["passed"] = False
    return metrics
