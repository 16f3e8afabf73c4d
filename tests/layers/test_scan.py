"""Layers under `nn.scan` (`jaxaudio.layers.scan`, `Llama(scan_layers=True)`).

A scanned LLaMA given the unrolled model's parameters (stacked by `relayout`) computes the
same logits, the same parameter gradients (with LoRA on query/value and a remat policy),
the same greedy and beam-search decodings; its parameters carry the logical axis `layers`;
the two layouts convert into each other exactly, LoRA adapters merge per layer, and the
usual `layers_\\d+` target regexes adapt every scanned layer.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaudio.convert.engine import flatten, unflatten
from jaxaudio.generate import generate
from jaxaudio.layers.lora import LoraConfig, lora, merge
from jaxaudio.layers.scan import relayout, restack, scanned_stacks, unrolled_name, unstack
from jaxaudio.models.llama import Llama
from jaxaudio.models.whisper import WhisperEncoder

KW = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
          num_key_value_heads=2)
LORA = LoraConfig(targets=r"layers_\d+/attn/(query|value)", rank=2)
IDS = (jnp.arange(14).reshape(2, 7) * 5) % 64


@pytest.fixture(scope="module")
def models():
    plain, scanned = Llama(**KW), Llama(**KW, scan_layers=True, remat="full")
    with lora(LORA):
        variables = nn.unbox(plain.init(jax.random.PRNGKey(0), IDS))
        abstract = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), IDS))
    # Non-zero adapters, so that they change the output.
    flat = {k: v + 0.05 if k.endswith("lora_b") else v for k, v in flatten(variables).items()}
    variables = unflatten(flat)
    stacked = unflatten(relayout(flatten(variables), flatten(nn.unbox(abstract)).keys()))
    return plain, scanned, variables, stacked, abstract


def test_layout_and_axis_names(models):
    _, _, variables, stacked, abstract = models
    flat = flatten(stacked)
    assert flat["params/layers/attn/query/kernel"].shape == (3, 32, 4, 8)
    assert flat["params/layers/attn/query/lora_a"].shape == (3, 32, 2)  # adapters stack too
    assert not any("layers_" in k for k in flat)
    np.testing.assert_array_equal(flat["params/layers/mlp/up/kernel"][2],
                                  flatten(variables)["params/layers_2/mlp/up/kernel"])
    names = {"/".join(str(getattr(e, "key", e)) for e in p): v for p, v in jax.tree_util.tree_flatten_with_path(
        abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]}
    assert names["params/layers/attn/query/kernel"].names == ("layers", "embed", "heads", "kv")
    # Back to the unrolled layout, exactly.
    back = relayout(flat, flatten(variables).keys())
    assert set(back) == set(flatten(variables))
    for k, v in flatten(variables).items():
        np.testing.assert_array_equal(back[k], v)


def test_same_logits_and_gradients(models):
    plain, scanned, variables, stacked, _ = models
    mask = jnp.ones_like(IDS).at[0, :2].set(0)

    def loss(model, v):
        with lora(LORA):
            logits = model.apply(v, IDS, attention_mask=mask)
        return jnp.mean(logits ** 2), logits

    (_, la), ga = jax.value_and_grad(lambda v: loss(plain, v), has_aux=True)(variables)
    (_, lb), gb = jax.value_and_grad(lambda v: loss(scanned, v), has_aux=True)(stacked)
    np.testing.assert_allclose(lb, la, atol=2e-6, rtol=1e-5)
    gb = relayout(flatten(gb), flatten(ga).keys())
    for k, v in flatten(ga).items():
        np.testing.assert_allclose(gb[k], v, atol=2e-6, rtol=1e-4, err_msg=k)
    assert np.abs(flatten(ga)["params/layers_1/attn/value/lora_a"]).max() > 0


@pytest.mark.parametrize("beams", [1, 3])
def test_same_decoding(models, beams):
    plain, scanned, variables, stacked, _ = models
    mask = jnp.ones_like(IDS).at[1, :3].set(0)
    out = [generate(m, v["params"], input_ids=IDS, attention_mask=mask, max_new_tokens=6, eos_token_id=63,
                    pad_token_id=0, num_beams=beams, lora=LORA)
           for m, v in ((plain, variables), (scanned, stacked))]
    np.testing.assert_array_equal(out[1].tokens, out[0].tokens)
    np.testing.assert_allclose(out[1].scores, out[0].scores, atol=1e-5)


def test_a_scanned_decoder_carries_one_stacked_cache(models):
    """Decoding, a scanned stack's KV cache is one `[layers, batch, len, kv_heads, head_dim]`
    pair carried through the layer scan (written in place, not read from one stack and
    written to another); it holds what the unrolled layers' caches hold."""
    plain, scanned, variables, stacked, _ = models
    caches = []
    for m, v in ((plain, variables), (scanned, stacked)):
        dec = m.clone(decode=True)
        with lora(LORA):
            cache = dec.init(jax.random.PRNGKey(0), IDS)["cache"]
            _, updated = dec.apply({**v, "cache": cache}, IDS, mutable=["cache"])
        caches.append(flatten(updated["cache"]))
    unrolled, carried = caches
    assert set(carried) == {"index", "kv_cache/cached_key", "kv_cache/cached_value"}
    assert int(carried["index"]) == IDS.shape[1]
    for i in range(carried["kv_cache/cached_key"].shape[0]):
        for name in ("cached_key", "cached_value"):
            np.testing.assert_allclose(carried[f"kv_cache/{name}"][i], unrolled[f"layers_{i}/attn/{name}"],
                                       atol=1e-5, err_msg=f"layer {i} {name}")


def test_merge_folds_each_layer(models):
    plain, scanned, variables, stacked, _ = models
    merged = merge(stacked["params"], LORA.scale)
    assert not any("lora" in k for k in flatten(merged))
    want = relayout(flatten(merge(variables["params"], LORA.scale)), flatten(merged).keys())
    for k, v in flatten(merged).items():
        np.testing.assert_allclose(v, want[k], atol=1e-6, err_msg=k)
    with lora(LORA):
        adapted = scanned.apply(stacked, IDS)
    np.testing.assert_allclose(scanned.apply({"params": merged}, IDS), adapted, atol=1e-5)


def test_names_and_partial_stacks():
    assert unrolled_name("llm/layers/attn/query") == "llm/layers_0/attn/query"
    assert unrolled_name("layers/mlp/up") == "layers_0/mlp/up"
    assert unrolled_name("llm/layers_3/attn") == "llm/layers_3/attn"
    flat = {"a/layers_0/w": np.zeros(2), "a/layers_2/w": np.ones(2), "b/layers/w": np.zeros((2, 3))}
    assert scanned_stacks(flat) == {"b/layers"}
    # A gap (layer 1 missing) is not stacked: the caller reports what is missing.
    assert set(restack(flat, {"a/layers"})) == set(flat)
    assert set(unstack(flat)) == {"a/layers_0/w", "a/layers_2/w", "b/layers_0/w", "b/layers_1/w"}


def test_scanned_whisper_encoder():
    kw = dict(num_mel_bins=8, d_model=16, encoder_layers=3, encoder_attention_heads=2, encoder_ffn_dim=32,
              max_source_positions=20, dropout=0.1)
    plain, scanned = WhisperEncoder(**kw), WhisperEncoder(**kw, scan_layers=True, remat="full")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 40))
    variables = plain.init(jax.random.PRNGKey(0), x)
    abstract = nn.unbox(jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), x)))
    assert flatten(abstract)["params/layers/attn/query/kernel"].shape == (3, 16, 2, 8)
    stacked = unflatten(relayout(flatten(nn.unbox(variables)), flatten(abstract).keys()))
    np.testing.assert_allclose(scanned.apply(stacked, x), plain.apply(variables, x), atol=2e-6)
    # train=True (a Python bool through the scan and the remat): dropout runs, gradients flow.
    grads = jax.grad(lambda p: jnp.sum(scanned.apply(p, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
                                       ** 2))(stacked)
    assert np.all(np.abs(flatten(grads)["params/layers/mlp/fc1/kernel"]).reshape(3, -1).max(1) > 0)
