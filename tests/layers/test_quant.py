"""int8 kernels with per-output-channel scales (`layers.quant`): the quantization's error
bound and axes, a `Dense` computing with one (values, input gradients, LoRA on top, under
`nn.scan`), and the backward keeping no float copy of the weight."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaudio.layers import dense
from jaxaudio.layers.dense import abstract_init
from jaxaudio.layers.lora import LoraConfig, lora
from jaxaudio.layers.quant import (QTensor, dequantize_tree, kernel_reduce_axes, quantize, quantized_contract,
                                   StoredKernel, is_quantized, store, stored_as, stored_q_spec)


def _normal(seed, shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape) * jnp.linspace(0.1, 3.0, shape[-1])


@pytest.mark.parametrize("shape, n_in", [((12, 7), 1), ((3, 4, 10), 2), ((5, 2, 3, 4), 1)])
def test_round_trip_error_is_at_most_half_a_step(shape, n_in):
    w = _normal(0, shape)
    qt = quantize(w, kernel_reduce_axes(len(shape), n_in, len(shape) - n_in))
    assert qt.q.dtype == jnp.int8 and qt.scale.dtype == jnp.float32 and qt.shape == shape
    assert int(jnp.max(jnp.abs(qt.q))) == 127  # absmax: the largest entry of each channel hits the range
    err = jnp.abs(w - qt.dequantize())
    assert bool(jnp.all(err <= qt.scale / 2 * (1 + 1e-6))), float(jnp.max(err / qt.scale))


def test_scales_are_per_output_channel():
    w = np.array(_normal(1, (6, 5)))
    w[:, 2] = 0.0  # a zero column: q = 0, a finite scale
    qt = quantize(w, kernel_reduce_axes(2, 1, 1))
    assert isinstance(qt.q, np.ndarray) and qt.scale.shape == (1, 5)  # numpy in, numpy out
    np.testing.assert_allclose(qt.scale[0, [0, 1, 3, 4]], np.abs(w[:, [0, 1, 3, 4]]).max(0) / 127, rtol=1e-6)
    assert np.all(qt.q[:, 2] == 0) and np.isfinite(qt.scale).all()
    assert len(set(qt.scale[0].tolist())) == 5

    out = quantize(_normal(2, (3, 4, 10)), kernel_reduce_axes(3, 2, 1))  # [heads, head_dim, embed]
    assert out.scale.shape == (1, 1, 10) and out.reduce_axes == (0, 1)
    stacked = _normal(3, (4, 6, 5))  # [layers, in, out]: each layer its own scales
    axes = kernel_reduce_axes(3, 1, 1)
    assert axes == (1,)
    qs = quantize(stacked, axes)
    assert qs.scale.shape == (4, 1, 5)
    for layer in range(4):
        one = quantize(stacked[layer], (0,))
        np.testing.assert_array_equal(np.asarray(qs.q[layer]), np.asarray(one.q))
        np.testing.assert_array_equal(np.asarray(qs.scale[layer]), np.asarray(one.scale))


def test_numpy_and_jax_quantize_alike():
    w = np.asarray(_normal(4, (9, 4)))
    a, b = quantize(w, (0,)), quantize(jnp.asarray(w), (0,))
    np.testing.assert_array_equal(a.q, np.asarray(b.q))
    np.testing.assert_array_equal(a.scale, np.asarray(b.scale))


def test_dequantize_tree_takes_qtensors_and_restored_dicts():
    qt = quantize(_normal(5, (4, 3)), (0,))
    restored = {"q": np.asarray(qt.q), "scale": np.asarray(qt.scale)}  # orbax without a target
    tree = {"a": {"kernel": qt, "bias": jnp.ones(3)}, "b": {"kernel": restored}, "c": {"q": np.ones(2)}}
    out = dequantize_tree(tree)
    np.testing.assert_array_equal(np.asarray(out["a"]["kernel"]), np.asarray(qt.dequantize()))
    np.testing.assert_array_equal(out["b"]["kernel"], np.asarray(qt.dequantize()))
    assert out["b"]["kernel"].dtype == np.float32 and out["c"]["q"] is tree["c"]["q"]


# --- Dense with a quantized kernel ------------------------------------------------------------
X = jax.random.normal(jax.random.PRNGKey(7), (2, 3, 4, 6))  # [batch, length, heads, head_dim]


def _layer(n_in):
    return dense(5, ("heads", "kv", "embed")[-n_in - 1:], axis=tuple(range(-n_in, 0)), name="proj")


def _quantized(n_in):
    """(layer, params with the kernel quantized, the dequantised kernel)."""
    layer = _layer(n_in)
    params = nn.unbox(layer.init(jax.random.PRNGKey(0), X))["params"]
    qt = quantize(params["kernel"] * 40.0, kernel_reduce_axes(n_in + 1, n_in, 1))
    params = dict(params, kernel=qt, bias=jnp.linspace(-1, 1, 5))
    return layer, params, qt.dequantize()


def _reference(x, kernel, bias, n_in):
    return jnp.tensordot(x, kernel, axes=(tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))) + bias


@pytest.mark.parametrize("n_in", [1, 2])
def test_dense_with_a_quantized_kernel_is_the_dequantised_matmul(n_in):
    layer, params, kernel = _quantized(n_in)

    def got(x):
        return layer.apply({"params": params}, x)

    def want(x):
        return _reference(x, kernel, params["bias"], n_in)

    def loss(x, fn):
        return jnp.sum(jnp.sin(fn(x)))
    np.testing.assert_allclose(np.asarray(got(X)), np.asarray(want(X)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(X, got)), np.asarray(jax.grad(loss)(X, want)),
                               rtol=1e-5, atol=1e-5)


def test_quantized_contract_computes_in_the_layer_dtype():
    layer, params, kernel = _quantized(1)
    layer = layer.clone(dtype=jnp.bfloat16)
    y = layer.apply({"params": params}, X)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(_reference(X, kernel, params["bias"], 1)),
                               rtol=2e-2, atol=5e-2)


def test_the_backward_keeps_no_float_copy_of_the_weight():
    """The vjp's residuals hold int8 `q` and the scales: nothing float of the kernel's shape,
    while plain autodiff of the same product keeps `q` converted to float."""
    _, params, _ = _quantized(2)
    qt = params["kernel"]

    def residuals(fn):
        _, vjp = jax.vjp(fn, X)
        return [(x.shape, x.dtype) for x in jax.tree.leaves(vjp)]

    def float_kernels(res):
        return [r for r in res if r[0] == qt.shape and jnp.issubdtype(r[1], jnp.floating)]
    ours = residuals(lambda x: quantized_contract(x, qt, 2, jnp.float32))
    plain = residuals(lambda x: jnp.tensordot(x, qt.q.astype(jnp.float32), 2) * qt.scale.reshape(5))
    assert float_kernels(plain)  # the check sees the copy when there is one
    assert float_kernels(ours) == [] and (qt.shape, jnp.dtype(jnp.int8)) in ours


def test_the_frozen_weight_gets_no_gradient():
    _, params, _ = _quantized(1)
    g = jax.grad(lambda k, x: jnp.sum(quantized_contract(x, k, 1, jnp.float32)), allow_int=True)(params["kernel"], X)
    assert g.q.dtype == jax.dtypes.float0 and not np.any(np.asarray(g.scale))


class _Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _layer(1)(x)


def test_lora_adds_its_adapter_to_a_quantized_dense():
    cfg = LoraConfig(targets="proj", rank=2, alpha=4.0)
    layer = _Model()  # LoRA targets module paths: the layer needs a parent
    with lora(cfg):
        params = nn.unbox(layer.init(jax.random.PRNGKey(0), X))["params"]["proj"]
    params = dict(params, kernel=quantize(params["kernel"], (0,)),
                  lora_b=jax.random.normal(jax.random.PRNGKey(2), params["lora_b"].shape))
    kernel = params["kernel"].dequantize()

    def loss(adapters, p=params):
        with lora(cfg):
            return jnp.sum(jnp.sin(layer.apply({"params": {"proj": dict(p, **adapters)}}, X)))

    def reference(adapters):
        delta = cfg.scale * (X @ adapters["lora_a"] @ adapters["lora_b"])
        return jnp.sum(jnp.sin(_reference(X, kernel, params["bias"], 1) + delta))
    adapters = {k: params[k] for k in ("lora_a", "lora_b")}
    np.testing.assert_allclose(float(loss(adapters)), float(reference(adapters)), rtol=1e-5)
    got, want = jax.grad(loss)(adapters), jax.grad(reference)(adapters)
    for k in adapters:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-4, atol=1e-5, err_msg=k)
    assert float(jnp.abs(got["lora_a"]).max()) > 0


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(dense(6, ("embed", "mlp"), name="fc")(x)), None


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3,
                       metadata_params={nn.PARTITION_NAME: "layers"})
        return scan(name="layers")(x, None)[0]


def test_a_scanned_stack_of_quantized_kernels():
    """`abstract_init` finds the stacked kernel; quantized over its input axis only, each
    layer of the scan computes with its own slice."""
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 6))
    model = _Stack()
    abstract, kernels = abstract_init(model.init, jax.random.PRNGKey(0), x)
    assert kernels == {"layers/fc/kernel": (1, 1)}
    assert nn.unbox(abstract)["params"]["layers"]["fc"]["kernel"].shape == (3, 6, 6)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), x))["params"]
    stacked = params["layers"]["fc"]["kernel"] * 30.0
    qt = quantize(stacked, kernel_reduce_axes(3, *kernels["layers/fc/kernel"]))
    assert qt.scale.shape == (3, 1, 6)
    got = model.apply({"params": {"layers": {"fc": dict(params["layers"]["fc"], kernel=qt)}}}, x)
    want = model.apply({"params": {"layers": {"fc": dict(params["layers"]["fc"], kernel=qt.dequantize())}}}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_a_misshapen_quantized_kernel_is_refused():
    layer, params, _ = _quantized(1)
    qt = params["kernel"]
    with pytest.raises(ValueError, match=r"kernel: a quantized kernel of shape \(3, 5\) where the layer needs \(6, 5\)"):
        layer.apply({"params": dict(params, kernel=QTensor(qt.q[:3], qt.scale))}, X)
    with pytest.raises(ValueError, match="not per output channel"):
        layer.apply({"params": dict(params, kernel=QTensor(qt.q, jnp.ones((6, 5))))}, X)


# --- per-head projections: `q` stored output-major -------------------------------------------
def test_a_per_head_projection_is_stored_output_major():
    """`[embed, heads, head_dim]` (one input axis, several output axes) keeps `q` as
    `[heads * head_dim, embed]`: the same integers and scales, transposed; a stack of them
    `[layers, heads * head_dim, embed]`, layer by layer the same."""
    w = np.asarray(_normal(8, (8, 2, 3)))
    qt = quantize(w, kernel_reduce_axes(3, 1, 2))
    assert qt.output_major and qt.q.shape == (6, 8) and qt.scale.shape == (1, 2, 3) and qt.shape == (8, 2, 3)
    scale = np.abs(w).max(axis=0, keepdims=True) / 127  # numpy, independently of quantize
    np.testing.assert_allclose(qt.scale, scale, rtol=1e-6)
    want_q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(qt.q, want_q.reshape(8, 6).T)
    np.testing.assert_allclose(qt.dequantize(np.float32), want_q * scale, rtol=1e-6)
    restored = {"q": qt.q, "scale": qt.scale}  # a checkpoint read without a target
    np.testing.assert_array_equal(dequantize_tree({"k": restored})["k"], qt.dequantize(np.float32))

    stacked = np.asarray(_normal(9, (4, 8, 2, 3)))
    qs = quantize(stacked, kernel_reduce_axes(4, 1, 2))
    assert qs.q.shape == (4, 6, 8) and qs.shape == (4, 8, 2, 3)
    for layer in range(4):
        one = quantize(stacked[layer], (0,))
        np.testing.assert_array_equal(qs.q[layer], one.q)
        np.testing.assert_array_equal(qs.scale[layer], one.scale)
    # Two input axes, one output (an attention output `[heads, head_dim, embed]`): as it is.
    assert not quantize(np.ones((2, 3, 8), np.float32), (0, 1)).output_major


def test_the_stored_q_of_a_per_head_projection_is_sharded_by_its_heads():
    assert stored_q_spec(("fsdp", "tensor", None), 3, (0,)) == ("tensor", "fsdp")
    assert stored_q_spec((None, "fsdp", "tensor"), 4, (1,)) == (None, "tensor", "fsdp")  # a stack
    assert stored_q_spec(("fsdp", "tensor", "x"), 3, (0,)) == (("tensor", "x"), "fsdp")
    assert stored_q_spec(("fsdp",), 3, (0,)) == (None, "fsdp")
    assert stored_q_spec(("fsdp", "tensor"), 2, (0,)) == ("fsdp", "tensor")  # one output axis: as it is


class _Heads(nn.Module):
    scanned: bool = False

    @nn.compact
    def __call__(self, x):
        if not self.scanned:
            return dense((2, 3), ("embed", "heads", "kv"), name="query")(x)

        class Block(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                y = dense((2, 3), ("embed", "heads", "kv"), name="query")(x)
                return x + jnp.tanh(y.reshape(x.shape)), None
        scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3,
                       metadata_params={nn.PARTITION_NAME: "layers"})
        return scan(name="layers")(x, None)[0]


@pytest.mark.parametrize("scanned", [False, True])
def test_dense_with_an_output_major_kernel_is_the_dequantised_matmul(scanned):
    """Values and input gradients, alone and as a scanned stack; with a LoRA adapter on top."""
    model = _Heads(scanned)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 6))
    params = nn.unbox(model.init(jax.random.PRNGKey(0), x))["params"]
    path = ("layers", "query") if scanned else ("query",)
    sub = params[path[0]][path[1]] if scanned else params["query"]
    qt = quantize(sub["kernel"] * 30.0, kernel_reduce_axes(sub["kernel"].ndim, 1, 2))
    assert qt.output_major

    def with_kernel(kernel):
        new = dict(sub, kernel=kernel, bias=jnp.linspace(-1, 1, 6).reshape(2, 3) * jnp.ones(sub["bias"].shape))
        return {path[0]: {path[1]: new}} if scanned else {"query": new}

    def loss(x, kernel):
        return jnp.sum(jnp.sin(model.apply({"params": with_kernel(kernel)}, x)))
    np.testing.assert_allclose(float(loss(x, qt)), float(loss(x, qt.dequantize())), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(x, qt)), np.asarray(jax.grad(loss)(x, qt.dequantize())),
                               rtol=1e-4, atol=1e-5)
    if scanned:
        return
    cfg = LoraConfig(targets="query", rank=2, alpha=4.0)
    with lora(cfg):
        adapters = nn.unbox(model.init(jax.random.PRNGKey(1), x))["params"]["query"]
    adapters = {"lora_a": adapters["lora_a"], "lora_b": jax.random.normal(jax.random.PRNGKey(2), adapters["lora_b"].shape)}

    def lora_out(kernel):
        with lora(cfg):
            return model.apply({"params": {"query": dict(with_kernel(kernel)["query"], **adapters)}}, x)
    np.testing.assert_allclose(np.asarray(lora_out(qt)), np.asarray(lora_out(qt.dequantize())), rtol=1e-5, atol=1e-5)


def test_a_float_per_head_projection_is_kept_output_major():
    """`store` for a float storage dtype: `q` in that dtype, output-major, scales of 1 — the
    same kernel back; a restored `{"q", "scale"}` dict of it is recognised by its ranks."""
    w = np.asarray(_normal(10, (3, 8, 2, 3)))  # a stack of [embed, heads, head_dim]
    how = StoredKernel("bfloat16", kernel_reduce_axes(4, 1, 2), 4)
    kept = store(w, how)
    assert kept.output_major and kept.q.dtype == jnp.bfloat16 and kept.q.shape == (3, 6, 8)
    assert np.all(kept.scale == 1) and kept.scale.shape == (3, 1, 2, 3)
    np.testing.assert_array_equal(kept.dequantize(np.float32), w.astype(jnp.bfloat16).astype(np.float32))
    assert stored_as(kept) == how and stored_as(quantize(w, (1,))) == StoredKernel("int8", (1,), 4)
    assert is_quantized({"q": kept.q, "scale": kept.scale})
    assert not is_quantized({"q": w, "scale": np.ones_like(w)})  # a float pair of equal ranks: not ours
    with pytest.raises(ValueError, match="only output-major"):
        store(np.ones((4, 5), np.float32), StoredKernel("bfloat16", (0,), 2))
