"""`MultiHeadAttention` against `torch.nn.functional.scaled_dot_product_attention`.

Our module's random weights are copied into a plain torch computation (linear
projections, SDPA, output projection), so the tests check the projections' layout
(`[embed, heads, head_dim]` kernels), masks, additive biases, grouped kv heads,
cross-attention and the KV cache against an independent implementation.
"""
import re
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxaudio.layers import MultiHeadAttention

ATOL = 1e-5
B, L, E, H = 2, 7, 32, 4


def _x(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _random_params(module: nn.Module, *args, seed: int = 0, **kwargs):
    """Init `module`, then replace every parameter with O(1)-scale noise (biases included)."""
    params = nn.unbox(module.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree.flatten(params)
    leaves = [jnp.asarray(0.3 * rng.standard_normal(p.shape), jnp.float32) for p in leaves]
    return jax.tree.unflatten(tree, leaves)


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _torch_attention(params, x, context=None, *, num_heads, num_kv_heads=None, attn_mask=None, is_causal=False,
                     tile_kv=False):
    """Reference: separate q/k/v Linear layers, SDPA, output Linear, all in torch."""
    x = _t(x)
    src = x if context is None else _t(context)
    kv_heads = num_kv_heads or num_heads

    def proj(p, inp):  # kernel [in, heads, head_dim] == torch Linear weight [heads*head_dim, in].T
        w = _t(p["kernel"]).reshape(p["kernel"].shape[0], -1)
        return inp @ w + _t(p["bias"]).reshape(-1)

    def split(t, heads):  # [b, len, heads*hd] -> [b, heads, len, hd]
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    q = split(proj(params["query"], x), num_heads)
    k = split(proj(params["key"], src), kv_heads)
    v = split(proj(params["value"], src), kv_heads)
    if kv_heads != num_heads:  # query head h reads kv head h // (heads / kv_heads)
        g = num_heads // kv_heads
        if tile_kv:  # the wrong grouping, for a guard
            k, v = k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1)
        else:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        attn_mask = torch.from_numpy(np.asarray(attn_mask))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    o = o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    w_out = _t(params["out"]["kernel"]).reshape(-1, params["out"]["kernel"].shape[-1])
    return (o @ w_out + _t(params["out"]["bias"])).detach().numpy()


def _padding_mask(lengths, kv_len) -> np.ndarray:
    """`[batch, 1, 1, kv_len]`, True where the key is a real token."""
    return (np.arange(kv_len)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]


def _cached_keys(cache) -> jax.Array:
    """The cached keys, whatever the cache variable is called (`key`, `cached_key`, ...)."""
    (name,) = [k for k in cache if "key" in k]
    return cache[name]


def _cache_index(cache) -> int:
    (value,) = [v for v in cache.values() if jnp.issubdtype(v.dtype, jnp.integer)]
    return int(value)


def test_self_attention_matches_sdpa():
    mha = MultiHeadAttention(num_heads=H)
    x = _x(0, (B, L, E))
    params = _random_params(mha, jnp.asarray(x))
    assert params["query"]["kernel"].shape == (E, H, E // H)
    assert params["out"]["kernel"].shape == (H, E // H, E)
    y = np.asarray(mha.apply({"params": params}, jnp.asarray(x)))
    np.testing.assert_allclose(y, _torch_attention(params, x, num_heads=H), atol=ATOL)


def test_boolean_padding_mask_matches_sdpa():
    mha = MultiHeadAttention(num_heads=H)
    x = _x(1, (B, L, E))
    params = _random_params(mha, jnp.asarray(x), seed=1)
    mask = _padding_mask([L, 4], L)
    y = np.asarray(mha.apply({"params": params}, jnp.asarray(x), mask=jnp.asarray(mask)))
    np.testing.assert_allclose(y, _torch_attention(params, x, num_heads=H, attn_mask=mask), atol=ATOL)
    # The mask matters: the padded example differs from unmasked attention.
    unmasked = np.asarray(mha.apply({"params": params}, jnp.asarray(x)))
    np.testing.assert_allclose(y[0], unmasked[0], atol=ATOL)
    assert np.max(np.abs(y[1] - unmasked[1])) > 1e-2
    # Changing padded keys does not change the output.
    x2 = x.copy()
    x2[1, 4:] = 100.0
    y2 = np.asarray(mha.apply({"params": params}, jnp.asarray(x2), mask=jnp.asarray(mask)))
    np.testing.assert_allclose(y2[1, :4], y[1, :4], atol=ATOL)


def test_additive_bias_matches_sdpa():
    mha = MultiHeadAttention(num_heads=H)
    x = _x(2, (B, L, E))
    params = _random_params(mha, jnp.asarray(x), seed=2)
    bias = (2.0 * _x(3, (1, H, L, L))).astype(np.float32)  # like a relative-position bias
    y = np.asarray(mha.apply({"params": params}, jnp.asarray(x), bias=jnp.asarray(bias)))
    np.testing.assert_allclose(y, _torch_attention(params, x, num_heads=H, attn_mask=_t(bias)), atol=ATOL)
    plain = np.asarray(mha.apply({"params": params}, jnp.asarray(x)))
    assert np.max(np.abs(y - plain)) > 1e-2


def test_grouped_kv_heads_match_repeat_interleave():
    heads, kv_heads = 8, 2
    mha = MultiHeadAttention(num_heads=heads, num_kv_heads=kv_heads, head_dim=8)
    x = _x(4, (B, L, E))
    params = _random_params(mha, jnp.asarray(x), seed=4)
    assert params["key"]["kernel"].shape == (E, kv_heads, 8)
    assert params["query"]["kernel"].shape == (E, heads, 8)
    mask = _padding_mask([L, 5], L)
    y = np.asarray(mha.apply({"params": params}, jnp.asarray(x), mask=jnp.asarray(mask)))
    ref = _torch_attention(params, x, num_heads=heads, num_kv_heads=kv_heads, attn_mask=mask)
    np.testing.assert_allclose(y, ref, atol=ATOL)
    # Guard: tiling the kv heads (`repeat`) instead would pair query heads with the wrong kv heads.
    tiled = _torch_attention(params, x, num_heads=heads, num_kv_heads=kv_heads, attn_mask=mask, tile_kv=True)
    assert np.max(np.abs(tiled - ref)) > 1e-2


def test_cross_attention_with_context():
    ctx_len, ctx_dim = 5, 24
    mha = MultiHeadAttention(num_heads=H)
    x, ctx = _x(5, (B, L, E)), _x(6, (B, ctx_len, ctx_dim))
    params = _random_params(mha, jnp.asarray(x), jnp.asarray(ctx), seed=5)
    assert params["key"]["kernel"].shape == (ctx_dim, H, E // H)
    mask = _padding_mask([ctx_len, 3], ctx_len)
    y = np.asarray(mha.apply({"params": params}, jnp.asarray(x), jnp.asarray(ctx), mask=jnp.asarray(mask)))
    assert y.shape == (B, L, E)
    np.testing.assert_allclose(y, _torch_attention(params, x, ctx, num_heads=H, attn_mask=mask), atol=ATOL)


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_causal_matches_sdpa(kv_heads):
    mha = MultiHeadAttention(num_heads=H, num_kv_heads=kv_heads)
    x = _x(7, (B, L, E))
    params = _random_params(mha, jnp.asarray(x), seed=7)
    y = np.asarray(mha.apply({"params": params}, jnp.asarray(x), is_causal=True))
    np.testing.assert_allclose(y, _torch_attention(params, x, num_heads=H, num_kv_heads=kv_heads, is_causal=True),
                               atol=ATOL)


@pytest.mark.parametrize("chunks", [[1] * L, [3, 1, 1, 1, 1], [3, 2, 1, 1]],
                         ids=["one_at_a_time", "prefill3", "prefill3_then_2"])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_kv_cache_decoding_equals_causal_pass(chunks, kv_heads):
    assert sum(chunks) == L
    x = _x(8, (B, L, E))
    full = MultiHeadAttention(num_heads=H, num_kv_heads=kv_heads)
    params = _random_params(full, jnp.asarray(x), seed=8)
    want = np.asarray(full.apply({"params": params}, jnp.asarray(x), is_causal=True))
    np.testing.assert_allclose(want, _torch_attention(params, x, num_heads=H, num_kv_heads=kv_heads, is_causal=True),
                               atol=ATOL)

    dec = MultiHeadAttention(num_heads=H, num_kv_heads=kv_heads, decode=True)
    cache = dec.init(jax.random.PRNGKey(0), jnp.asarray(x))["cache"]  # sized by the full length
    kv = kv_heads or H
    assert _cached_keys(cache).shape == (B, L, kv, E // H)
    assert _cache_index(cache) == 0
    outs, start = [], 0
    for n in chunks:
        y, updated = dec.apply({"params": params, "cache": cache}, jnp.asarray(x[:, start:start + n]),
                               mutable=["cache"])
        cache = updated["cache"]
        start += n
        assert _cache_index(cache) == start
        outs.append(np.asarray(y))
    got = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(got, want, atol=ATOL)
    # The cache holds the keys of the whole sequence, as the full pass computes them.
    k_full = np.asarray(x) @ np.asarray(params["key"]["kernel"]).reshape(E, -1) + np.asarray(
        params["key"]["bias"]).reshape(-1)
    np.testing.assert_allclose(np.asarray(_cached_keys(cache)).reshape(B, L, -1), k_full, atol=ATOL)


def test_kv_cache_with_padding_mask():
    """A key-padding mask combines with the cache's causal mask."""
    x = _x(9, (B, L, E))
    full = MultiHeadAttention(num_heads=H)
    params = _random_params(full, jnp.asarray(x), seed=9)
    pad = _padding_mask([L, L], L)
    pad[1, 0, 0, 1] = False  # example 1 never attends to position 1
    causal = np.tril(np.ones((L, L), bool))[None, None]
    want = _torch_attention(params, x, num_heads=H, attn_mask=pad & causal)
    dec = MultiHeadAttention(num_heads=H, decode=True)
    cache = dec.init(jax.random.PRNGKey(0), jnp.asarray(x))["cache"]
    outs = []
    for t in range(L):
        y, updated = dec.apply({"params": params, "cache": cache}, jnp.asarray(x[:, t:t + 1]),
                               mask=jnp.asarray(pad), mutable=["cache"])
        cache = updated["cache"]
        outs.append(np.asarray(y))
    np.testing.assert_allclose(np.concatenate(outs, 1), want, atol=ATOL)


def test_fused_qkv_matches_separate_projections():
    """timm's fused layout `[embed, 3, heads, head_dim]` is q, k, v stacked."""
    x = _x(10, (B, L, E))
    fused = MultiHeadAttention(num_heads=H, fused_qkv=True)
    p = _random_params(fused, jnp.asarray(x), seed=10)
    assert p["qkv"]["kernel"].shape == (E, 3, H, E // H)
    sep = {name: {"kernel": p["qkv"]["kernel"][:, i], "bias": p["qkv"]["bias"][i]}
           for i, name in enumerate(("query", "key", "value"))}
    sep["out"] = p["out"]
    y = np.asarray(fused.apply({"params": p}, jnp.asarray(x)))
    np.testing.assert_allclose(y, _torch_attention(sep, x, num_heads=H), atol=ATOL)


def test_fused_qkv_rejects_cross_attention():
    mha = MultiHeadAttention(num_heads=H, fused_qkv=True)
    x, ctx = jnp.zeros((1, 3, E)), jnp.zeros((1, 5, E))
    with pytest.raises(ValueError, match="fused_qkv.*self-attention"):
        mha.init(jax.random.PRNGKey(0), x, ctx)


def test_fused_qkv_rejects_grouped_kv_heads():
    mha = MultiHeadAttention(num_heads=H, num_kv_heads=2, fused_qkv=True)
    with pytest.raises(ValueError, match="fused_qkv"):
        mha.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, E)))


def test_attention_dropout_matches_expectation_and_only_in_training():
    """Dropped probabilities, rescaled: the mean over many masks is the plain attention;
    deterministic calls (and rate 0) take the fused path unchanged."""
    from jaxaudio.layers.attention import dot_product_attention
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (1, 3, 4, 8))
    k = jax.random.normal(kk, (1, 5, 2, 8))  # grouped kv heads
    v = jax.random.normal(kv, (1, 5, 2, 8))
    mask = jnp.array([True, True, True, True, False])[None, None, None]
    plain = dot_product_attention(q, k, v, mask=mask)
    drop = jax.vmap(lambda r: dot_product_attention(q, k, v, mask=mask, dropout_rate=0.3, dropout_rng=r))(
        jax.random.split(jax.random.PRNGKey(1), 4000))
    np.testing.assert_allclose(drop.mean(0), plain, atol=0.05)
    assert not np.allclose(drop[0], plain, atol=1e-3)
    np.testing.assert_allclose(dot_product_attention(q, k, v, mask=mask, dropout_rate=0.0,
                                                     dropout_rng=jax.random.PRNGKey(2)), plain, atol=1e-6)

    m = MultiHeadAttention(num_heads=2, dropout_rate=0.5)
    x = jax.random.normal(kq, (2, 4, 8))
    params = m.init(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(m.apply(params, x), m.apply(params, x, deterministic=True))
    train = m.apply(params, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    assert not np.allclose(train, m.apply(params, x), atol=1e-4)


# --- blocked attention (the CPU path) against torch SDPA -------------------------------------
def _sdpa(q, k, v, mask=None, bias=None, is_causal=False):
    """torch SDPA on `[batch, len, heads, dim]` arrays (kv heads repeated for groups)."""
    groups = q.shape[2] // k.shape[2]
    qt, kt, vt = (_t(x).transpose(1, 2) for x in (q, k, v))
    kt, vt = kt.repeat_interleave(groups, 1), vt.repeat_interleave(groups, 1)
    attn = None
    if bias is not None:
        attn = _t(bias)
    if mask is not None:
        m = torch.from_numpy(np.asarray(mask))
        attn = m if attn is None else attn.masked_fill(~m, float("-inf"))
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn, is_causal=is_causal).transpose(1, 2).numpy()


@pytest.mark.parametrize("case", ["plain", "padding_mask", "full_mask", "bias", "causal", "grouped", "cross"])
@pytest.mark.parametrize("chunk", [16, None])
def test_blocked_attention_matches_sdpa(case, chunk):
    """Query blocks of 16 over 50 queries (the last one overlapping), or one block, give SDPA's result."""
    from jaxaudio.layers.attention import blocked_attention
    q_len, kv_len = 50, 50 if case != "cross" else 37
    q = _x(1, (2, q_len, 4, 8))
    k, v = _x(2, (2, kv_len, 2 if case == "grouped" else 4, 8)), _x(3, (2, kv_len, 2 if case == "grouped" else 4, 8))
    kw = {}
    if case == "padding_mask":
        kw["mask"] = np.arange(kv_len)[None, None, None, :] < np.array([50, 31])[:, None, None, None]
    if case == "full_mask":  # per-query rows, as a [batch, heads, q, kv] mask
        kw["mask"] = np.random.default_rng(4).random((2, 4, q_len, kv_len)) < 0.7
    if case == "bias":
        kw["bias"] = _x(5, (1, 4, q_len, kv_len))
    if case == "causal":
        kw["is_causal"] = True
    got = jax.jit(lambda q, k, v: blocked_attention(q, k, v, chunk=chunk, **kw))(q, k, v)
    want = _sdpa(q, k, v, **kw)
    assert got.shape == q.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, err_msg=f"tolerance {ATOL}")


@pytest.mark.parametrize("chunk", [16, None])
def test_blocked_attention_gradients_match_sdpa(chunk):
    """Gradients through the blocked path (max held constant, rows normalised after `p v`)
    are SDPA's, for q, k, v and an additive bias, with a padding mask and causal rows."""
    from jaxaudio.layers.attention import blocked_attention
    q, k, v = _x(11, (2, 40, 4, 8)), _x(12, (2, 40, 2, 8)), _x(13, (2, 40, 2, 8))
    bias = _x(14, (1, 4, 40, 40))
    mask = np.arange(40)[None, None, None, :] < np.array([40, 29])[:, None, None, None]
    w = _x(15, (2, 40, 4, 8))

    def loss(q, k, v, bias):
        return jnp.sum(w * blocked_attention(q, k, v, mask=mask, bias=bias, is_causal=True, chunk=chunk))
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    tq, tk, tv, tb = (_t(a).requires_grad_() for a in (q, k, v, bias))
    attn = tb.masked_fill(~torch.from_numpy(mask), float("-inf")) + torch.full((40, 40), float("-inf")).triu(1)
    out = F.scaled_dot_product_attention(tq.transpose(1, 2), tk.transpose(1, 2).repeat_interleave(2, 1),
                                         tv.transpose(1, 2).repeat_interleave(2, 1), attn_mask=attn)
    (out.transpose(1, 2) * _t(w)).sum().backward()
    for name, g, t in zip("qkvb", got, (tq, tk, tv, tb)):
        np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), atol=1e-4, err_msg=f"d loss / d {name}")


def test_cpu_takes_the_blocked_path_and_chunks_large_logits(monkeypatch):
    """`dot_product_attention` with no implementation named runs `blocked_attention` on CPU,
    never `jax.nn`'s; it loops over query blocks once the logits pass the budget, and gives
    XLA's result; smaller ones stay in one block."""
    from jaxaudio.layers import attention
    assert attention.cpu_chunk(1, 12, 1500, 1500) == 192  # Whisper-small: 8 blocks
    assert attention.cpu_chunk(4, 12, 496, 496) == 128  # BEATs, batch 4
    assert attention.cpu_chunk(8, 12, 128, 128) == 128  # BERT-base, batch 8: one block
    assert attention.cpu_chunk(1, 8, 1500, 1500) == attention.MAX_CHUNK  # Whisper-base
    assert attention.cpu_chunk(64, 12, 1500, 1500) == attention.MIN_CHUNK
    long_q = _x(6, (1, 1024, 8, 8))  # 8M logits: 4 blocks of 256
    kv = _x(7, (1, 1024, 8, 8))
    want = jax.nn.dot_product_attention(long_q, kv, kv, implementation="xla")
    if jax.default_backend() == "cpu":
        def refuse(*args, **kwargs):
            raise AssertionError("jax.nn.dot_product_attention called on CPU")
        monkeypatch.setattr(attention.jax.nn, "dot_product_attention", refuse)
        assert re.search("scan|while", str(jax.make_jaxpr(attention.dot_product_attention)(long_q, kv, kv)))
    assert not re.search("scan|while", str(jax.make_jaxpr(attention.dot_product_attention)(long_q[:, :64], kv, kv)))
    got = jax.jit(attention.dot_product_attention)(long_q, kv, kv)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL)


def test_blocked_attention_dropout_is_unbiased_in_every_block():
    """With blocks of 2 queries, each block draws its own masks; averaged over many, every
    row is the plain attention, and one draw differs from it."""
    from jaxaudio.layers.attention import blocked_attention
    q, k, v = _x(8, (1, 5, 2, 4)), _x(9, (1, 6, 2, 4)), _x(10, (1, 6, 2, 4))
    plain = blocked_attention(q, k, v)
    drop = jax.vmap(lambda r: blocked_attention(q, k, v, chunk=2, dropout_rate=0.3, dropout_rng=r))(
        jax.random.split(jax.random.PRNGKey(1), 4000))
    np.testing.assert_allclose(drop.mean(0), plain, atol=0.05)
    assert not np.allclose(drop[0], plain, atol=1e-3)
