"""The C++ CPU attention kernel (`jaxaudio.layers.cpu_kernel`) against torch SDPA: values,
gradients (through `kernel_attention`), shapes that leave partial register tiles, grouped
heads, vmap, when `dot_product_attention` picks it, and its errors."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxaudio.layers import cpu_kernel
from jaxaudio.layers.attention import dot_product_attention

ATOL = 1e-5
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")


def _x(seed, shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _sdpa(q, k, v, mask=None, is_causal=False):
    """torch SDPA on `[..., len, heads, dim]` (kv heads repeated for groups). A fully masked
    row attends uniformly, as ours and XLA's: torch would give NaN, so its mask gets -1e30."""
    groups = q.shape[-2] // k.shape[-2]
    qt, kt, vt = (torch.from_numpy(np.asarray(x)).transpose(-3, -2) for x in (q, k, v))
    kt, vt = kt.repeat_interleave(groups, -3), vt.repeat_interleave(groups, -3)
    keep = np.ones((q.shape[-3], k.shape[-3]), bool) if mask is None else np.asarray(mask)
    if is_causal:
        keep = keep & np.tril(np.ones((q.shape[-3], k.shape[-3]), bool))
    bias = torch.from_numpy(np.where(keep, 0.0, -1e30).astype(np.float32))
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias).transpose(-3, -2).numpy()


_kernel = jax.jit(cpu_kernel.attention)


@pytest.mark.parametrize("q_shape, kv_shape, scale", [
    ((1, 300, 4, 64), (1, 300, 4, 64), 1.0),   # several 48-query tasks, 6-row tiles
    ((2, 37, 3, 16), (2, 53, 3, 16), 1.0),     # partial tiles in queries and keys
    ((2, 20, 8, 32), (2, 45, 2, 32), 1.0),     # grouped kv heads
    ((1, 5, 2, 16), (1, 1, 2, 16), 1.0),       # one key
    ((2, 3, 9, 4, 16), (2, 3, 24, 4, 16), 1.0),  # two leading batch dimensions
    ((1, 50, 2, 64), (1, 70, 2, 64), 6.0),     # large logits: most exponentials underflow
])
def test_kernel_matches_sdpa(q_shape, kv_shape, scale):
    q, k, v = _x(1, q_shape, scale), _x(2, kv_shape, scale), _x(3, kv_shape)
    got = np.asarray(_kernel(q, k, v))
    assert got.shape == q_shape
    np.testing.assert_allclose(got, _sdpa(q, k, v), atol=ATOL, rtol=1e-5, err_msg=f"tolerance {ATOL}")


def _masks(kind, batch, heads, q_len, kv_len):
    rng = np.random.default_rng(20)
    if kind == "padding":  # [batch, 1, 1, kv]
        return np.arange(kv_len)[None, None, None, :] < rng.integers(1, kv_len + 1, batch)[:, None, None, None]
    if kind == "per_query":  # [batch, heads, q, kv], one row fully masked
        mask = rng.random((batch, heads, q_len, kv_len)) < 0.6
        mask[0, 1, 2] = False
        return mask
    return rng.random((q_len, kv_len)) < 0.6  # [q, kv], shared


@pytest.mark.parametrize("kind, is_causal", [(kind, causal) for kind in ("padding", "per_query", "shared")
                                              for causal in (False, True)] + [(None, True)])
def test_masked_kernel_matches_sdpa(kind, is_causal):
    """Padding, per-query (one row fully masked: uniform over every key, even causal ones)
    and shared masks, with and without causal rows."""
    q, k, v = _x(21, (2, 61, 4, 32)), _x(22, (2, 61, 2, 32)), _x(23, (2, 61, 2, 32))
    mask = None if kind is None else _masks(kind, 2, 4, 61, 61)
    got = np.asarray(jax.jit(lambda q, k, v: cpu_kernel.attention(q, k, v, mask, is_causal))(q, k, v))
    np.testing.assert_allclose(got, _sdpa(q, k, v, mask, is_causal), atol=ATOL, rtol=1e-5)


def test_kernel_attention_gradients_match_sdpa():
    """Differentiating `dot_product_attention(implementation="cpu_kernel")` gives torch's
    gradients (the backward is `blocked_attention`'s), and no kernel call is left in it."""
    q, k, v, w = _x(4, (2, 41, 4, 16)), _x(5, (2, 41, 2, 16)), _x(6, (2, 41, 2, 16)), _x(7, (2, 41, 4, 16))
    mask = _masks("padding", 2, 4, 41, 41)

    def loss(q, k, v, mask):
        return jnp.sum(w * dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cpu_kernel"))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    assert "jaxaudio_cpu" not in grad.lower(q, k, v, mask).as_text()
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    bias = torch.from_numpy(np.where(mask & np.tril(np.ones((41, 41), bool)), 0.0, -np.inf).astype(np.float32))
    out = F.scaled_dot_product_attention(tq.transpose(1, 2), tk.transpose(1, 2).repeat_interleave(2, 1),
                                         tv.transpose(1, 2).repeat_interleave(2, 1), attn_mask=bias)
    (out.transpose(1, 2) * torch.from_numpy(w)).sum().backward()
    for name, g, t in zip("qkv", grad(q, k, v, mask), (tq, tk, tv)):
        np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), atol=1e-4, err_msg=f"d loss / d {name}")


def test_vmap_over_the_kernel():
    q, k, v = _x(8, (3, 2, 10, 2, 16)), _x(9, (3, 2, 12, 2, 16)), _x(10, (3, 2, 12, 2, 16))
    got = jax.jit(jax.vmap(cpu_kernel.attention))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), _sdpa(q, k, v), atol=ATOL)
    mask = np.random.default_rng(0).random((3, 1, 1, 12)) < 0.7  # per vmapped example
    got = jax.jit(jax.vmap(lambda q, k, v, m: cpu_kernel.attention(q, k, v, m, True)))(q, k, v, mask)
    want = np.stack([_sdpa(q[i], k[i], v[i], mask[i], True) for i in range(3)])
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL)


def test_cpu_attention_takes_the_kernel_unless_a_bias_or_dropout(monkeypatch):
    q = _x(11, (1, 20, 2, 64))

    def hlo(**kw):
        return jax.jit(lambda q: dot_product_attention(q, q, q, **kw)).lower(q).as_text()
    assert cpu_kernel.TARGET in hlo()
    assert cpu_kernel.MASKED_TARGET in hlo(mask=np.ones((1, 1, 1, 20), bool))
    assert cpu_kernel.MASKED_TARGET in hlo(is_causal=True)
    assert "jaxaudio_cpu" not in hlo(bias=np.zeros((1, 2, 20, 20), np.float32))
    assert "jaxaudio_cpu" not in hlo(dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0))
    assert "jaxaudio_cpu" not in hlo(mask=np.ones((3, 1, 1, 20), bool))  # does not broadcast to batch 1
    assert "jaxaudio_cpu" not in jax.jit(lambda q: dot_product_attention(q[..., :8], q[..., :8], q[..., :8])) \
        .lower(q).as_text()  # head dim 8: not a multiple of 16
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)  # e.g. no compiler
    assert "jaxaudio_cpu" not in hlo()


def test_unsupported_operands_are_refused_by_name():
    q = jnp.zeros((1, 4, 2, 24))
    with pytest.raises(ValueError, match=r"dim % 16 == 0.*got q \(1, 4, 2, 24\)"):
        cpu_kernel.attention(q, q, q)
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_kernel.attention(*(jnp.zeros((1, 4, 2, 16), jnp.bfloat16),) * 3)
    # Asked for by name, the kernel refuses what it cannot compute rather than dropping it.
    x = jnp.zeros((1, 4, 2, 16))
    with pytest.raises(ValueError, match="implementation='cpu_kernel' takes no additive bias and no dropout"):
        dot_product_attention(x, x, x, bias=jnp.zeros((1, 2, 4, 4)), implementation="cpu_kernel")
    with pytest.raises(ValueError, match="implementation='cpu_kernel' takes no additive bias and no dropout"):
        dot_product_attention(x, x, x, dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0),
                              implementation="cpu_kernel")


def test_build_caches_and_names_a_failing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXAUDIO_KERNEL_CACHE", str(tmp_path))
    lib = cpu_kernel.build()
    assert lib.parent == tmp_path and lib.exists()
    stamp = os.stat(lib).st_mtime_ns
    assert cpu_kernel.build() == lib and os.stat(lib).st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(RuntimeError, match="/no/such/c\\+\\+"):
        cpu_kernel.build(compiler="/no/such/c++")
    with pytest.raises(RuntimeError, match="could not build"):
        cpu_kernel.build(compiler=shutil.which("false"))
