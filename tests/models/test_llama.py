"""LLaMA against transformers' `LlamaForCausalLM`, converted from `save_pretrained` checkpoints.

Two tiny random models (hidden 64, 2 layers, 4 heads, intermediate 128, vocab 128):
grouped kv heads (2) with a separate `lm_head`, and 4 kv heads with tied embeddings. Their
weights are drawn with std 0.2 (and RMSNorm weights around 1) so that logits spread
(std ~1.5) and a wrong layout shows far above the 1e-4 tolerance.

Hugging Face's forward counts positions 0.. over padding; `generate` (and our default)
counts them from the attention mask, so the padded-batch comparisons pass HF the
`cumsum(mask) - 1` positions and compare the real tokens (padded query rows attend to
nothing; their values are arbitrary in both).
"""
import functools
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxaudio.convert.engine import ConversionError, convert
from jaxaudio.convert.hf import convert_hf, load_pretrained
from jaxaudio.convert.io import load_state_dict
from jaxaudio.convert.llama import config_from_hf, key_map
from jaxaudio.layers.norms import RMSNorm
from jaxaudio.models.llama import Llama, causal_lm_loss

ATOL = 1e-4
B, L, V, HIDDEN = 3, 9, 128, 64
PAD_LEFT = (0, 2, 5)  # left padding per example
CONFIGS = {
    "gqa": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
}


def _hf_config(hidden=HIDDEN, **overrides):
    from transformers import LlamaConfig
    kw = dict(vocab_size=V, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.2, rms_norm_eps=1e-6, rope_theta=10000.0)
    return LlamaConfig(**{**kw, **overrides})


def hf_model(seed=0, **overrides):
    """A random `LlamaForCausalLM` (eval mode) whose RMSNorm weights are not all ones."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


@functools.lru_cache(maxsize=None)
def _saved(kind: str, root: str):
    hf = hf_model(seed=len(kind), **CONFIGS[kind])
    path = os.path.join(root, kind)
    hf.save_pretrained(path)
    variables, config = convert_hf(path)
    return hf, path, Llama(**config["kwargs"]), variables


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, root):
    return _saved(request.param, root)


@pytest.fixture(scope="module")
def gqa(root):
    return _saved("gqa", root)


def _batch(seed=0):
    ids = np.random.default_rng(seed).integers(3, V, (B, L))
    mask = np.ones((B, L), np.int64)
    for i, n in enumerate(PAD_LEFT):
        mask[i, :n] = 0
        ids[i, :n] = 0
    positions = np.where(mask, np.cumsum(mask, 1) - 1, 0)
    return ids, mask, positions


@functools.lru_cache(maxsize=None)
def _forward(model):
    return jax.jit(lambda v, ids, mask: model.apply(v, ids, attention_mask=mask))


def _hf_logits(hf, **kwargs):
    with torch.no_grad():
        return hf(**{k: torch.as_tensor(v) for k, v in kwargs.items()}).logits.numpy()


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_variables_layout_and_axes(gqa):
    _, _, model, variables = gqa
    p = variables["params"]
    assert sorted(p) == ["embed_tokens", "layers_0", "layers_1", "lm_head", "norm"]
    layer = p["layers_0"]
    assert sorted(layer) == ["attn", "input_layernorm", "mlp", "post_attention_layernorm"]
    chex.assert_shape([layer["attn"]["query"]["kernel"], layer["attn"]["key"]["kernel"],
                       layer["attn"]["out"]["kernel"], layer["mlp"]["gate"]["kernel"],
                       layer["mlp"]["down"]["kernel"], p["embed_tokens"]["embedding"], p["lm_head"]["kernel"]],
                      [(64, 4, 16), (64, 2, 16), (4, 16, 64), (64, 128), (128, 64), (V, 64), (64, V)])
    assert "bias" not in layer["attn"]["query"]
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    specs = nn.get_partition_spec(boxed)["params"]
    assert tuple(specs["embed_tokens"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
    assert tuple(specs["layers_1"]["attn"]["key"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(specs["layers_1"]["mlp"]["up"]["kernel"]) == ("embed", "mlp")
    names = {n for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
             for n in spec}
    assert names <= {"vocab", "embed", "heads", "kv", "mlp", "norm"}, names


def test_padded_batch_logits_match_transformers(saved):
    hf, _, model, variables = saved
    ids, mask, positions = _batch()
    got = _forward(model)(variables, jnp.asarray(ids), jnp.asarray(mask))
    chex.assert_shape(got, (B, L, V))
    ref = _hf_logits(hf, input_ids=ids, attention_mask=mask, position_ids=positions)
    err = _max_err(got[mask == 1], ref[mask == 1])
    assert err <= ATOL, f"{model.tie_word_embeddings=} max abs error {err:.2e} > {ATOL}"
    assert ref.std() > 0.5  # logits spread, so the tolerance means something


def test_unpadded_logits_match_transformers_default_positions(saved):
    hf, _, model, variables = saved
    ids = np.random.default_rng(1).integers(0, V, (B, L))
    got = _forward(model)(variables, jnp.asarray(ids), jnp.ones((B, L), jnp.int32))
    err = _max_err(got, _hf_logits(hf, input_ids=ids))
    assert err <= ATOL, f"max abs error {err:.2e} > {ATOL}"


def test_inputs_embeds_match_transformers(gqa):
    hf, _, model, variables = gqa
    _, mask, positions = _batch()
    embeds = (0.5 * np.random.default_rng(2).standard_normal((B, L, HIDDEN))).astype(np.float32)
    got = jax.jit(lambda v, e, m: model.apply(v, inputs_embeds=e, attention_mask=m))(
        variables, jnp.asarray(embeds), jnp.asarray(mask))
    ref = _hf_logits(hf, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    err = _max_err(got[mask == 1], ref[mask == 1])
    assert err <= ATOL, f"max abs error {err:.2e} > {ATOL}"
    # `embed` builds the same inputs_embeds as the token path.
    ids, _, _ = _batch()
    e = model.apply(variables, jnp.asarray(ids), method=model.embed)
    np.testing.assert_array_equal(np.asarray(e), np.asarray(variables["params"]["embed_tokens"]["embedding"])[ids])


def test_loss_matches_transformers(gqa):
    hf, _, model, variables = gqa
    ids, mask, positions = _batch(3)
    labels = ids.copy()
    labels[mask == 0] = -100
    for i, n in enumerate(PAD_LEFT):  # the prompt (first 2 real tokens) carries no loss
        labels[i, n:n + 2] = -100
    logits = _forward(model)(variables, jnp.asarray(ids), jnp.asarray(mask))
    loss, count = causal_lm_loss(logits, jnp.asarray(labels))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions),
                 labels=torch.tensor(labels)).loss.item()
    assert int(count) == int((labels[:, 1:] != -100).sum())
    assert abs(float(loss) - ref) <= 1e-5, f"loss {float(loss):.6f} vs HF {ref:.6f} (tolerance 1e-5)"
    none, zero = causal_lm_loss(logits, jnp.full((B, L), -100))
    assert float(none) == 0.0 and int(zero) == 0


def test_kv_cache_decoding_equals_full_forward(gqa):
    """Prefill 5 slots of a left-padded batch, then one token per call, default positions."""
    hf, _, model, variables = gqa
    ids, mask, positions = _batch(4)
    full = np.asarray(_forward(model)(variables, jnp.asarray(ids), jnp.asarray(mask)))
    dec = model.clone(decode=True)
    cache = dec.init(jax.random.PRNGKey(0), jnp.asarray(ids))["cache"]
    step = jax.jit(lambda c, x: dec.apply({"params": variables["params"], "cache": c}, x, attention_mask=jnp.asarray(mask),
                                          mutable=["cache"]))
    outs, start = [], 0
    for n in (5, 1, 1, 1, 1):
        logits, upd = step(cache, jnp.asarray(ids[:, start:start + n]))
        cache, start = upd["cache"], start + n
        outs.append(np.asarray(logits))
    got = np.concatenate(outs, 1)
    real = mask == 1
    err = _max_err(got[real], full[real])
    assert err <= ATOL, f"cached vs full max abs error {err:.2e} > {ATOL}"
    err_hf = _max_err(got[real], _hf_logits(hf, input_ids=ids, attention_mask=mask, position_ids=positions)[real])
    assert err_hf <= ATOL, f"cached vs HF max abs error {err_hf:.2e} > {ATOL}"
    assert int(cache["index"]) == L


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "eager"])
def test_output_shapes(gqa, use_jit):
    _, _, model, variables = gqa
    ids = jnp.asarray(_batch()[0])

    def run(v, x):
        logits, hidden = model.apply(v, x, return_hidden=True)
        last = model.apply(v, x, logits_to_keep=1)
        return logits, hidden, last

    fn = jax.jit(run) if use_jit else run
    logits, hidden, last = fn(variables, ids)
    chex.assert_shape([logits, hidden, last], [(B, L, V), (B, L, HIDDEN), (B, 1, V)])
    chex.assert_type([logits, last], jnp.float32)
    chex.assert_tree_all_finite((logits, hidden))
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(logits[:, -1]), atol=1e-5)


def test_bfloat16_compute(gqa):
    _, _, model, variables = gqa
    ids, mask, _ = _batch()
    ref = np.asarray(_forward(model)(variables, jnp.asarray(ids), jnp.asarray(mask)))
    got = Llama(**{**_kwargs(model), "dtype": jnp.bfloat16}).apply(variables, jnp.asarray(ids),
                                                                   attention_mask=jnp.asarray(mask))
    assert got.dtype == jnp.float32
    err = _max_err(got[mask == 1], ref[mask == 1])
    assert err <= 0.25, f"bf16 vs fp32 max abs error {err:.3f} (logit std {ref.std():.2f})"


def _kwargs(model: Llama) -> dict:
    return {f: getattr(model, f) for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                           "rope_theta", "tie_word_embeddings")}


def test_remat_gives_the_same_gradients(gqa):
    _, _, model, variables = gqa
    ids, mask, _ = _batch()
    labels = jnp.where(jnp.asarray(mask) == 1, jnp.asarray(ids), -100)

    def grads(m):
        def loss(p):
            return causal_lm_loss(m.apply({"params": p}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)),
                                  labels)[0]
        return jax.jit(jax.grad(loss))(variables["params"])

    g, g_remat = grads(model), grads(Llama(**_kwargs(model), remat=True))
    # Recomputed activations may fuse differently: float32 rounding (~1e-6), not a remat bug.
    chex.assert_trees_all_close(g, g_remat, atol=1e-5)


def test_rms_norm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    x = (3.0 + 2.0 * np.random.default_rng(5).standard_normal((2, 5, 48))).astype(np.float32)
    ref_norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ref_norm.weight.copy_(1.0 + 0.3 * torch.randn(48))
    norm = RMSNorm(1e-5)
    params = {"params": {"scale": jnp.asarray(ref_norm.weight.detach().numpy())}}
    assert jax.tree.map(jnp.shape, nn.unbox(norm.init(jax.random.PRNGKey(0), jnp.asarray(x)))) == \
        {"params": {"scale": (48,)}}
    got = np.asarray(norm.apply(params, jnp.asarray(x)))
    np.testing.assert_allclose(got, ref_norm(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    small = 1e-3 * x[..., :8]  # eps dominates: 1e-5 vs 1e-6 must differ
    a = RMSNorm(1e-5).apply({"params": {"scale": jnp.ones(8)}}, jnp.asarray(small))
    b = RMSNorm(1e-6).apply({"params": {"scale": jnp.ones(8)}}, jnp.asarray(small))
    assert _max_err(a, b) > 1e-2


# --- conversion -------------------------------------------------------------------------------------------


def test_launcher_end_to_end(gqa, tmp_path):
    from launch.convert import run_hf
    hf, path, model, _ = gqa
    summary = run_hf(path, str(tmp_path / "out"))
    assert summary["model"] == "llama" and summary["source_tensors"] == 21
    loaded, variables = load_pretrained(str(tmp_path / "out"))
    assert loaded == model
    ids, mask, positions = _batch(6)
    got = _forward(loaded)(variables, jnp.asarray(ids), jnp.asarray(mask))
    ref = _hf_logits(hf, input_ids=ids, attention_mask=mask, position_ids=positions)
    err = _max_err(got[mask == 1], ref[mask == 1])
    assert err <= ATOL, f"launcher-converted max abs error {err:.2e} > {ATOL}"


def _write_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def test_weights_of_another_hidden_size_are_refused(tmp_path):
    small = hf_model(hidden=32)
    small.save_pretrained(tmp_path)
    _write_config(str(tmp_path), hidden_size=HIDDEN, head_dim=16)  # config.json of the 64-wide model
    with pytest.raises(ConversionError) as e:
        convert_hf(str(tmp_path))
    msg = str(e.value)
    assert "mis-shaped" in msg
    for key in ("model.embed_tokens.weight (128, 32)", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight",
                "lm_head.weight"):
        assert key in msg, msg


@pytest.mark.parametrize("layers,expect", [(3, "params/layers_2/attn/query/kernel"),
                                           (1, "model.layers.1.mlp.gate_proj.weight")])
def test_layer_count_mismatch_lists_keys(gqa, tmp_path, layers, expect):
    _, path, _, _ = gqa
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(path, name), "rb") as src, open(tmp_path / name, "wb") as dst:
            dst.write(src.read())
    _write_config(str(tmp_path), num_hidden_layers=layers)
    with pytest.raises(ConversionError, match="missing variables" if layers == 3 else "unexpected keys") as e:
        convert_hf(str(tmp_path))
    assert expect in str(e.value)


def test_missing_config_field_is_named(gqa, tmp_path):
    _, path, _, _ = gqa
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    del cfg["num_hidden_layers"]
    with pytest.raises(ConversionError, match="'num_hidden_layers' is missing"):
        config_from_hf(cfg)


@pytest.mark.parametrize("field,value", [
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
    ("attention_bias", True),
    ("mlp_bias", True),
    ("hidden_act", "gelu"),
])
def test_unsupported_variants_are_refused_by_field(field, value):
    cfg = _hf_config().to_dict()
    cfg[field] = value
    with pytest.raises(ConversionError, match=repr(field)):
        config_from_hf(cfg)


def test_transformers_4_config_layout():
    """LLaMA-1 / Vicuna configs: `rope_theta` (or nothing) at the top, no kv heads field."""
    cfg = _hf_config().to_dict()
    del cfg["rope_parameters"], cfg["num_key_value_heads"], cfg["head_dim"]
    cfg["rope_scaling"] = None
    assert config_from_hf(cfg)["rope_theta"] == 10000.0
    cfg["rope_theta"] = 500000.0
    kwargs = config_from_hf(cfg)
    assert kwargs["rope_theta"] == 500000.0 and kwargs["num_key_value_heads"] == 4 and kwargs["head_dim"] is None


def test_rotary_buffers_are_checked_and_dropped(gqa):
    """Older checkpoints store `rotary_emb.inv_freq` per layer; it must agree with rope_theta."""
    _, path, model, variables = gqa
    sd = load_state_dict(path)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 16, 2, dtype=np.float32) / 16)
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = inv_freq
    out = convert(sd, key_map(model), nn.unbox(expected))
    chex.assert_trees_all_equal(out, jax.tree.map(np.asarray, variables))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = inv_freq * 2
    with pytest.raises(ConversionError, match="failed checks.*\n.*inv_freq"):
        convert(sd, key_map(model), nn.unbox(expected))
