"""LoRA on `Dense` layers chosen by regex, its apply-time scale, merging and PEFT files.

Parity with peft itself (the same adapter tensors on a transformers LLaMA) is in
`tests/models/test_llama_lora.py`; here the algebra is checked against plain numpy.
"""
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaudio.convert import ConversionError, flatten, unflatten
from jaxaudio.convert.peft import ModuleNames, export_peft, import_peft
from jaxaudio.layers import MultiHeadAttention, dense
from jaxaudio.layers.lora import TRAINABLE, LoraConfig, adapted_modules, lora, merge, split, combine


class Tiny(nn.Module):
    """Two blocks of attention + an MLP layer: multi-dimensional kernels (query [embed, heads,
    head_dim], out [heads, head_dim, embed]) and a plain one."""

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = x + MultiHeadAttention(num_heads=2, name=f"layers_{i}_attn")(x)
            x = x + dense(8, ("mlp", "embed"), name=f"layers_{i}_fc")(jax.nn.gelu(x))
        return x


CFG = LoraConfig(targets=r".*attn/(query|value|out)|layers_1_fc", rank=3, alpha=6.0)
X = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))


@pytest.fixture(scope="module")
def variables():
    with lora(CFG):
        v = nn.unbox(Tiny().init(jax.random.PRNGKey(0), X))
    # Non-zero B so the adapters change the output.
    flat = {k: (jax.random.normal(jax.random.PRNGKey(len(k)), a.shape) * 0.3 if k.endswith("lora_b") else a)
            for k, a in flatten(v["params"]).items()}
    return {"params": unflatten(flat)}


def _apply(variables, x=X, config=CFG, **kw):
    with lora(config, **kw):
        return Tiny().apply(variables, x)


def test_only_matching_layers_get_adapters(variables):
    mods = adapted_modules(variables["params"])
    assert mods == ["layers_0_attn/out", "layers_0_attn/query", "layers_0_attn/value",
                    "layers_1_attn/out", "layers_1_attn/query", "layers_1_attn/value", "layers_1_fc"]
    p = variables["params"]
    chex.assert_shape(p["layers_0_attn"]["query"]["lora_a"], (8, 3))
    chex.assert_shape(p["layers_0_attn"]["query"]["lora_b"], (3, 2, 4))
    chex.assert_shape(p["layers_0_attn"]["out"]["lora_a"], (2, 4, 3))
    chex.assert_shape(p["layers_0_attn"]["out"]["lora_b"], (3, 8))


def test_fresh_adapters_leave_the_model_unchanged():
    with lora(CFG):
        v = Tiny().init(jax.random.PRNGKey(0), X)
    a = v["params"]["layers_0_attn"]["query"]["lora_a"].unbox()
    assert np.abs(np.asarray(a)).max() <= 1 / np.sqrt(8)  # PEFT's kaiming_uniform(a=sqrt(5)) bound
    base, _ = split(nn.unbox(v)["params"])
    np.testing.assert_allclose(_apply(nn.unbox(v)), Tiny().apply({"params": base}, X), atol=1e-6)


def test_adapter_adds_scaled_low_rank_term(variables):
    """One layer by hand: y = x W + b + s x A B."""
    p = variables["params"]["layers_1_fc"]
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 8))

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return dense(8, ("mlp", "embed"), name="layers_1_fc")(x)
    for scale in (None, 0.5):
        with lora(CFG, scale=scale):
            got = One().apply({"params": {"layers_1_fc": p}}, x)
        s = CFG.scale if scale is None else scale
        want = x @ p["kernel"] + p["bias"] + s * (x @ p["lora_a"]) @ p["lora_b"]
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_scale_zero_and_no_context_give_the_base_model(variables):
    base, adapters = split(variables["params"])
    plain = Tiny().apply({"params": base}, X)
    np.testing.assert_allclose(_apply(variables, scale=0.0), plain, atol=1e-6)
    np.testing.assert_allclose(Tiny().apply(variables, X), plain, atol=1e-6)  # outside `lora`: plain
    assert not np.allclose(_apply(variables), plain, atol=1e-3)
    assert flatten(combine(base, adapters)).keys() == flatten(variables["params"]).keys()


def test_per_example_scale_switches_examples_independently(variables):
    both = _apply(variables, scale=jnp.array([0.0, CFG.scale]))
    np.testing.assert_allclose(both[0], _apply(variables, scale=0.0)[0], atol=1e-5)
    np.testing.assert_allclose(both[1], _apply(variables)[1], atol=1e-5)


def test_scale_is_an_apply_time_argument_under_jit(variables):
    f = jax.jit(lambda v, s: _apply(v, scale=s))
    np.testing.assert_allclose(f(variables, 0.7), _apply(variables, scale=0.7), atol=1e-5)
    np.testing.assert_allclose(f(variables, 0.0), _apply(variables, scale=0.0), atol=1e-5)


def test_merge_folds_adapters_into_kernels(variables):
    merged = merge(variables["params"], CFG.scale)
    assert not adapted_modules(merged)
    np.testing.assert_allclose(Tiny().apply({"params": merged}, X), _apply(variables), atol=1e-5)


def test_dropout_applies_only_in_training(variables):
    cfg = LoraConfig(CFG.targets, rank=3, alpha=6.0, dropout=0.5)
    np.testing.assert_allclose(_apply(variables, config=cfg), _apply(variables), atol=1e-6)

    def train(seed):
        with lora(cfg, deterministic=False):
            return Tiny().apply(variables, X, rngs={"dropout": jax.random.PRNGKey(seed)})
    assert not np.allclose(train(0), _apply(variables), atol=1e-4)
    np.testing.assert_allclose(train(0), train(0))


def test_only_adapters_train(variables):
    from ml_collections import ConfigDict

    from jaxaudio.train.optim import make_optimizer
    cfg = ConfigDict(dict(lr=1e-2, min_lr=0.0, warmup_steps=0, total_steps=10, b1=0.9, b2=0.999, eps=1e-8,
                          weight_decay=0.0, max_grad_norm=0.0, trainable=TRAINABLE, frozen="", no_decay="$^"))
    tx, _ = make_optimizer(cfg, variables["params"])
    params = variables["params"]
    grads = jax.grad(lambda p: jnp.sum(_apply({"params": p}) ** 2))(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, u in flatten(updates).items():
        assert bool(jnp.any(u != 0)) == ("lora_" in path), path


@pytest.mark.parametrize("kw, match", [(dict(rank=0), "rank"), (dict(dropout=1.0), "dropout"),
                                       (dict(targets="("), "regex")])
def test_bad_config_is_named(kw, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**{"targets": ".*", **kw})


NAMES = ModuleNames([("layers_{n}_attn/query", "model.layers.{n}.self_attn.q_proj"),
                     ("layers_{n}_attn/value", "model.layers.{n}.self_attn.v_proj"),
                     ("layers_{n}_attn/out", "model.layers.{n}.self_attn.o_proj"),
                     ("layers_{n}_fc", "model.layers.{n}.mlp.fc")])


def test_module_names_translate_both_ways():
    assert NAMES.to_torch("layers_12_attn/query") == "model.layers.12.self_attn.q_proj"
    assert NAMES.to_ours("model.layers.3.mlp.fc") == "layers_3_fc"
    assert NAMES.to_ours("model.layers.x.mlp.fc") is None
    assert NAMES.targets(["q_proj", "v_proj"]) == r"(.*/)?(layers_\d+_attn/query|layers_\d+_attn/value)"


def test_peft_export_import_round_trip(variables, tmp_path):
    from safetensors.numpy import load_file
    keys = export_peft(str(tmp_path), variables["params"], CFG, NAMES, base_model="tiny")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    # PEFT's layouts: A [r, in], B [out, r], with `in`/`out` flattened like torch's Linear.
    assert tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (3, 8)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (8, 3)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 3, 6.0)
    assert cfg["target_modules"] == ["fc", "o_proj", "q_proj", "v_proj"]

    base, _ = split(variables["params"])
    params, config = import_peft(str(tmp_path), base, NAMES)
    assert (config.rank, config.alpha) == (3, 6.0)
    for k, v in flatten(variables["params"]).items():
        np.testing.assert_array_equal(flatten(params)[k], v)
    np.testing.assert_allclose(_apply({"params": params}, config=config), _apply(variables), atol=1e-6)


def test_peft_import_finds_a_nested_model_and_default_spelling(variables, tmp_path):
    """SALMONN spells adapters `...q_proj.lora_A.default.weight`; the LLM may sit under a parent."""
    from safetensors.numpy import load_file, save_file
    export_peft(str(tmp_path), variables["params"], CFG, NAMES)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()},
              str(tmp_path / "adapter_model.safetensors"))
    base, _ = split(variables["params"])
    params, _ = import_peft(str(tmp_path), {"llm": base}, NAMES)
    np.testing.assert_array_equal(params["llm"]["layers_1_fc"]["lora_b"], variables["params"]["layers_1_fc"]["lora_b"])


def test_peft_import_lists_every_problem(variables, tmp_path):
    from safetensors.numpy import load_file, save_file
    export_peft(str(tmp_path), variables["params"], CFG, NAMES)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    tensors["base_model.model.model.layers.0.mlp.gate.lora_A.weight"] = np.zeros((3, 8), np.float32)
    tensors["base_model.model.model.layers.1.mlp.fc.lora_A.weight"] = np.zeros((3, 5), np.float32)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ConversionError) as e:
        import_peft(str(tmp_path), split(variables["params"])[0], NAMES)
    msg = str(e.value)
    assert "layers_0_attn/query: lora_B is missing" in msg
    assert "model.layers.0.mlp.gate.lora_A.weight: not a LoRA tensor of a known module" in msg
    assert "layers_1_fc: lora_A (3, 5)" in msg


def test_peft_import_refuses_other_adapter_types(variables, tmp_path):
    export_peft(str(tmp_path), variables["params"], CFG, NAMES)
    path = tmp_path / "adapter_config.json"
    for field, value, match in (("peft_type", "IA3", "only LORA"), ("use_dora", True, "use_dora"),
                                ("target_modules", ["k_proj"], "name no adaptable module")):
        cfg = json.loads(path.read_text())
        cfg[field] = value
        path.write_text(json.dumps(cfg))
        with pytest.raises(ConversionError, match=match):
            import_peft(str(tmp_path), variables["params"], NAMES)
        export_peft(str(tmp_path), variables["params"], CFG, NAMES)
    with pytest.raises(ConversionError, match="no adapter_config.json"):
        import_peft(str(tmp_path / "nowhere"), variables["params"], NAMES)
