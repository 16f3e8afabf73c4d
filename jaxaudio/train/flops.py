"""FLOP counts and model FLOPs utilisation (MFU) for benchmarks.

Two counts:
- `compiled_flops(compiled)`: what XLA's cost analysis of the compiled program says
  (`jax.jit(f).lower(...).compile().cost_analysis()['flops']`). It counts every HLO op
  the program runs, elementwise ops and optimizer updates included, on one device of
  the partitioned program.
- `spatial_ast_train_flops(model, batch, samples)`: an analytic count of the matrix
  multiplications and convolutions of one Spatial-AST train step (forward + backward),
  the usual "model FLOPs" convention (one multiply-add = 2 FLOPs).

`PEAK_FLOPS` holds dense (no sparsity) peak FLOP/s per GPU, looked up by
`jax.Device.device_kind`.
"""
import math
from typing import Any

# Dense peaks from NVIDIA's data sheets, FLOP/s. 'tf32' is the tensor-core rate that XLA
# uses for float32 matmuls at default precision on Ampere and Hopper; 'fp32' is the
# CUDA-core rate (what `jax_default_matmul_precision=highest` gets).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100 SXM": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100 PCIe": {"bf16": 756.5e12, "tf32": 378.0e12, "fp32": 51.2e12},
    "H100 NVL": {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "A100": {"bf16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
}


def peak_entry(device_kind: str) -> str | None:
    """The `PEAK_FLOPS` key for a `device_kind` such as 'NVIDIA H100 80GB HBM3', or None."""
    kind = device_kind.upper()
    if "H200" in kind:
        return "H200"
    if "H100" in kind:
        if "PCIE" in kind:
            return "H100 PCIe"
        if "NVL" in kind:
            return "H100 NVL"
        return "H100 SXM"
    if "A100" in kind:
        return "A100"
    return None


def peak_flops(device_kind: str, dtype: str) -> tuple[float, str] | None:
    """`(peak FLOP/s, description)` of one device for compute `dtype` ('bfloat16' or
    'float32'), or None for an unknown device. float32 uses the TF32 tensor-core peak."""
    entry = peak_entry(device_kind)
    if entry is None:
        return None
    key = "bf16" if dtype in ("bfloat16", "float16") else "tf32"
    return PEAK_FLOPS[entry][key], f"{entry} dense {key} {PEAK_FLOPS[entry][key] / 1e12:.1f} TFLOP/s"


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs per execution from XLA's cost analysis of a `jax.stages.Compiled` (or
    `Lowered`); None when the backend gives none. Older JAX returns a list of dicts."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    flops = float(analysis["flops"])
    return flops if flops > 0 else None


def spatial_ast_train_flops(model: Any, batch: int, samples: int) -> dict[str, float]:
    """Analytic matmul/conv FLOPs of one Spatial-AST train step on `batch` clips of
    `samples` samples, by part, and their `total`.

    The front end (STFT as an FFT or a DFT matmul, mel projections, bicubic resize) has no
    parameters before it, so it only runs forward; the stem conv needs its weight
    gradient only (2x forward); the patch embedding, blocks and heads need both
    gradients (3x forward). Patch masking in training keeps
    `int(grid_t * (1 - mask_t_prob)) * int(grid_f * (1 - mask_f_prob))` patches.
    """
    m = model
    frames = samples // m.hop_length + 1
    freq = m.n_fft // 2 + 1
    grid_t, grid_f = m.target_frames // m.patch_size, m.n_mels // m.patch_size
    keep_t = int(grid_t * (1 - m.mask_t_prob)) if m.mask_t_prob > 0 or m.mask_f_prob > 0 else grid_t
    keep_f = int(grid_f * (1 - m.mask_f_prob)) if m.mask_t_prob > 0 or m.mask_f_prob > 0 else grid_f
    tokens = m.num_cls_tokens + keep_t * keep_f
    d, mlp = m.embed_dim, int(m.embed_dim * m.mlp_ratio)
    outs = m.num_classes + m.num_distance_bins + m.num_azimuth_bins + m.num_elevation_bins

    if getattr(m, "stft_method", "matmul") == "matmul":
        stft = 2 * frames * m.n_fft * 2 * freq * 2  # 2 ears, real and imag kernels
    else:  # a real FFT: ~2.5 n log2 n per frame and ear
        stft = 2 * frames * 2.5 * m.n_fft * math.log2(m.n_fft)
    mel = 4 * frames * freq * m.n_mels * 2  # |X| of 2 ears, cos IPD, sin IPD
    resize = (m.target_frames * frames * m.n_mels * 4 * 2) if frames < m.target_frames else 0
    stem = m.target_frames * m.n_mels * 9 * 4 * 2
    patch = grid_t * grid_f * m.patch_size ** 2 * d * 2
    block = 2 * tokens * (4 * d * d + 2 * d * mlp) + 4 * tokens * tokens * d
    heads = 2 * d * outs
    parts = {
        "frontend": float(batch * (stft + mel + resize)),
        "stem": float(batch * 2 * stem),
        "patch_embed": float(batch * 3 * patch),
        "blocks": float(batch * 3 * m.depth * block),
        "heads": float(batch * 3 * heads),
    }
    parts["total"] = sum(parts.values())
    return parts


def jaxpr_matmul_flops(fn: Any, *args: Any) -> tuple[float, bool]:
    """`(FLOPs, exact)` of the matrix products and convolutions `fn(*args)` traces to (args
    may be ShapeDtypeStructs), for the whole program (all devices), remat recomputation
    included: a scan's body counts `length` times, which XLA's cost analysis does not do (it
    counts a loop body once, so a model with scanned layers looks 1/depth as costly).
    `exact` is False when a `while` loop (decoding) was counted as a single iteration, or a
    `cond` as its costliest branch."""
    import jax
    return matmul_flops(jax.make_jaxpr(fn)(*args))


def matmul_flops(closed_jaxpr: Any) -> tuple[float, bool]:
    """`jaxpr_matmul_flops` of an already traced program (e.g. `jax.jit(f).trace(...).jaxpr`)."""
    flags = {"exact": True}
    return float(_jaxpr_flops(closed_jaxpr.jaxpr, flags)), flags["exact"]


def _sub_jaxprs(value: Any) -> list:
    import jax
    core = jax.extend.core
    if isinstance(value, core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _jaxpr_flops(jaxpr: Any, flags: dict) -> float:
    import numpy as np
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lc])
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # the kernel: out features and in/groups x spatial
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / rhs[
                eqn.params["dimension_numbers"].rhs_spec[0]]
        elif name == "cond":
            flags["exact"] = False
            total += max(_jaxpr_flops(j, flags) for j in _sub_jaxprs(eqn.params["branches"]))
        else:
            inner = sum(_jaxpr_flops(j, flags) for v in eqn.params.values() for j in _sub_jaxprs(v))
            if name == "scan":
                inner *= eqn.params["length"]
            elif name == "while" and inner:
                flags["exact"] = False
            total += inner
    return total
