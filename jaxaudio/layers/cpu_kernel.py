"""Builds, loads and calls the C++ CPU attention kernel (`cpu_attention.cc`) through `jax.ffi`.

The kernel is compiled on first use with the system C++ compiler against the headers that
ship with jaxlib, and cached under `$JAXAUDIO_KERNEL_CACHE` (default
`~/.cache/jaxaudio/kernels`), keyed by the source, jaxlib version and compiler. Where it
cannot be used (not x86-64 with AVX2 and FMA, no compiler, a failed build) `available()`
says why once, as a warning, and attention stays on the XLA path. Set
`JAXAUDIO_CPU_KERNEL=0` to turn it off.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("cpu_attention.cc")
TARGET = "jaxaudio_cpu_attention"
MASKED_TARGET = "jaxaudio_cpu_masked_attention"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    root = os.environ.get("JAXAUDIO_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxaudio" / "kernels"


def build(compiler: str | None = None) -> Path:
    """Compiles `cpu_attention.cc` into a shared library (reused when already built); returns
    its path. Raises RuntimeError naming the compiler and its message when that fails."""
    cxx = compiler or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-mavx2", "-mfma", "-fno-math-errno",
             f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cxx, *flags, jax.__version__]).encode())
    lib = _cache_dir() / f"cpu_attention-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        partial = Path(tmp) / lib.name
        try:
            done = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
        except OSError as err:
            raise RuntimeError(f"could not run the C++ compiler {cxx!r}: {err}") from err
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} could not build {SOURCE}:\n{done.stderr[-2000:]}")
        os.replace(partial, lib)  # atomic: concurrent builders never load half a file
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered for this process (warns once when not)."""
    if os.environ.get("JAXAUDIO_CPU_KERNEL", "1") == "0":
        return False
    reason = None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        reason = f"needs x86-64, this is {platform.machine()}"
    elif not {"avx2", "fma"} <= _cpu_flags():
        reason = "needs a CPU with AVX2 and FMA"
    else:
        try:
            lib = ctypes.cdll.LoadLibrary(str(build()))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxaudioCpuAttention), platform="cpu")
            jax.ffi.register_ffi_target(MASKED_TARGET, jax.ffi.pycapsule(lib.JaxaudioCpuMaskedAttention),
                                        platform="cpu")
        except (OSError, RuntimeError) as err:
            reason = str(err)
    if reason:
        warnings.warn(f"jaxaudio: the C++ CPU attention kernel is off ({reason}); "
                      "attention uses the XLA path", RuntimeWarning, stacklevel=2)
    return reason is None


def supports(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> bool:
    """Whether `attention` takes these operands (float32, head dim a multiple of 16, grouped
    heads, at least one key; a mask that broadcasts to `[..., heads, q_len, kv_len]`)."""
    ok = (all(x.dtype == jnp.float32 for x in (q, k, v)) and q.shape[-1] % 16 == 0
          and k.shape == v.shape and k.shape[-1] == q.shape[-1] and k.shape[-3] > 0
          and q.shape[-2] % k.shape[-2] == 0 and q.shape[:-3] == k.shape[:-3])
    if ok and mask is not None:
        full = (*q.shape[:-3], q.shape[-2], q.shape[-3], k.shape[-3])
        ok = mask.ndim <= len(full) and all(m in (1, f) for m, f in zip(mask.shape[::-1], full[::-1]))
    return ok


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
              is_causal: bool = False) -> jax.Array:
    """Softmax attention by the kernel, no gradient (see `dot_product_attention`).

    q `[..., q_len, heads, head_dim]`, k/v `[..., kv_len, kv_heads, head_dim]` float32; mask
    (True = attend) broadcasts to `[..., heads, q_len, kv_len]`; `is_causal`: key j <= query
    i. Returns `[..., q_len, heads, head_dim]`. Check `supports` first.
    """
    if not supports(q, k, v, mask):
        raise ValueError("cpu_kernel.attention needs float32 q [..., q_len, heads, dim] and k, v "
                         "[..., kv_len, kv_heads, dim] with dim % 16 == 0, heads % kv_heads == 0 and "
                         f"kv_len > 0, and a mask broadcasting to [..., heads, q_len, kv_len]; got q {q.shape} "
                         f"{q.dtype}, k {k.shape} {k.dtype}, v {v.shape} {v.dtype}"
                         + ("" if mask is None else f", mask {mask.shape}"))
    if not available():
        raise RuntimeError("jaxaudio: the C++ CPU attention kernel is not available here (see the warning)")
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    result = jax.ShapeDtypeStruct(q.shape, q.dtype)
    if mask is None and not is_causal:
        return jax.ffi.ffi_call(TARGET, result, vmap_method="broadcast_all")(q, k, v, scale=scale)
    if mask is None:
        mask = jnp.zeros((0,), bool)  # causal rows only
    else:  # batch dimensions and keys spelled out; heads and queries may stay 1
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (q.ndim - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, (*q.shape[:-3], *mask.shape[-3:-1], k.shape[-3]))
    return jax.ffi.ffi_call(MASKED_TARGET, result, vmap_method="broadcast_all")(
        q, k, v, mask, scale=scale, causal=is_causal)
