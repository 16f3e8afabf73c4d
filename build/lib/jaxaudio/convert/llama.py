"""Key map: Hugging Face `LlamaForCausalLM` (LLaMA, LLaMA-2, Vicuna) -> `jaxaudio.models.llama.Llama`."""
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxaudio.convert.engine import ConversionError, Ignore, KeyMap, Rule, linear
from jaxaudio.convert.hf import hf_field
from jaxaudio.convert.peft import ModuleNames
from jaxaudio.layers.rotary import rotary_inv_freq
from jaxaudio.models.llama import Llama

HF_MODEL_TYPES = ("llama",)

# Our module paths <-> transformers' module names, for LoRA adapters in the PEFT format.
MODULE_NAMES = ModuleNames((
    ("layers_{n}/attn/query", "model.layers.{n}.self_attn.q_proj"),
    ("layers_{n}/attn/key", "model.layers.{n}.self_attn.k_proj"),
    ("layers_{n}/attn/value", "model.layers.{n}.self_attn.v_proj"),
    ("layers_{n}/attn/out", "model.layers.{n}.self_attn.o_proj"),
    ("layers_{n}/mlp/gate", "model.layers.{n}.mlp.gate_proj"),
    ("layers_{n}/mlp/up", "model.layers.{n}.mlp.up_proj"),
    ("layers_{n}/mlp/down", "model.layers.{n}.mlp.down_proj"),
))


def _rope_theta(hf: dict[str, Any]) -> float:
    """transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in `rope_theta` + `rope_scaling`."""
    theta = float(hf.get("rope_theta", 10000.0))  # LLaMA-1 / Vicuna configs predate the field
    for field in ("rope_scaling", "rope_parameters"):
        rope = hf.get(field) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ConversionError(f"config.json: field {field!r} has rope_type={kind!r}; only plain rotary "
                                  "embeddings ('default') are supported")
        theta = float(rope.get("rope_theta", theta))
    return theta


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """`Llama` kwargs from a `LlamaConfig` dict; unsupported variants are refused by field."""
    for field, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(field, supported) != supported:
            raise ConversionError(f"config.json: field {field!r} = {hf[field]!r} is not supported "
                                  f"(only {supported!r})")
    heads = int(hf_field(hf, "num_attention_heads"))
    hidden = int(hf_field(hf, "hidden_size"))
    head_dim = hf.get("head_dim")
    return {
        "vocab_size": int(hf_field(hf, "vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(hf_field(hf, "intermediate_size")),
        "num_hidden_layers": int(hf_field(hf, "num_hidden_layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(hf.get("num_key_value_heads") or heads),
        "rms_norm_eps": float(hf_field(hf, "rms_norm_eps")),
        "rope_theta": _rope_theta(hf),
        "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "head_dim": None if head_dim in (None, hidden // heads) else int(head_dim),
    }


def build(kwargs: dict[str, Any]) -> tuple[Llama, tuple]:
    return Llama(**kwargs), (jnp.zeros((1, 4), jnp.int32),)


def _inv_freq_check(model: Llama):
    want = np.asarray(rotary_inv_freq(model.head_dim or model.hidden_size // model.num_attention_heads,
                                      model.rope_theta))

    def check(x: np.ndarray) -> str | None:
        if x.shape != want.shape or np.max(np.abs(x - want) / want) > 1e-4:
            return f"rotary inv_freq {x.shape} differs from rope_theta={model.rope_theta}'s {want.shape}"
        return None
    return check


def key_map(model: Llama) -> KeyMap:
    layer = r"model\.layers\.(\d+)\."
    ignore = [Ignore(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",
                     "rotary frequencies are recomputed from rope_theta", _inv_freq_check(model))]
    rules = [
        Rule(r"model\.embed_tokens\.weight", "params/embed_tokens/embedding"),
        Rule(layer + r"self_attn\.q_proj\.weight", r"params/layers_\1/attn/query/kernel", linear),
        Rule(layer + r"self_attn\.k_proj\.weight", r"params/layers_\1/attn/key/kernel", linear),
        Rule(layer + r"self_attn\.v_proj\.weight", r"params/layers_\1/attn/value/kernel", linear),
        Rule(layer + r"self_attn\.o_proj\.weight", r"params/layers_\1/attn/out/kernel", linear),
        Rule(layer + r"mlp\.(gate|up|down)_proj\.weight", r"params/layers_\1/mlp/\2/kernel", linear),
        Rule(layer + r"(input_layernorm|post_attention_layernorm)\.weight", r"params/layers_\1/\2/scale"),
        Rule(r"model\.norm\.weight", "params/norm/scale"),
    ]
    if model.tie_word_embeddings:
        ignore.append(Ignore(r"lm_head\.weight", "tied to model.embed_tokens.weight (tie_word_embeddings)"))
    else:
        rules.append(Rule(r"lm_head\.weight", "params/lm_head/kernel", linear))
    return KeyMap(rules=rules, ignore=ignore)
