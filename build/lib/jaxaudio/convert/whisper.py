"""Hugging Face Whisper checkpoints -> `WhisperEncoder` (the encoder only).

Takes the state dicts of `WhisperForConditionalGeneration` (keys `model.encoder.*`),
`WhisperModel` (`encoder.*`) and a bare `WhisperEncoder` (no prefix). The decoder and the
output projection are dropped on purpose.
"""
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxaudio.convert.engine import ConversionError, Ignore, KeyMap, Rule, identity, linear
from jaxaudio.convert.hf import hf_field
from jaxaudio.models.whisper import WhisperEncoder

HF_MODEL_TYPES = ("whisper",)

# transformers' ACT2FN names -> ours.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                "silu": "silu", "swish": "silu"}
_DECODER = "decoder: jaxaudio uses the Whisper encoder only"


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """`WhisperEncoder` fields from a Whisper `config.json`."""
    kwargs = {name: int(hf_field(hf, name)) for name in (
        "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
        "max_source_positions")}
    act = hf_field(hf, "activation_function")
    if act not in _ACTIVATIONS:
        raise ConversionError(f"config.json: activation_function={act!r} is not supported; "
                              f"known: {sorted(_ACTIVATIONS)}")
    if kwargs["d_model"] % kwargs["encoder_attention_heads"]:
        raise ConversionError(f"config.json: d_model={kwargs['d_model']} is not a multiple of "
                              f"encoder_attention_heads={kwargs['encoder_attention_heads']}")
    return {**kwargs, "activation": _ACTIVATIONS[act]}


def build(kwargs: dict[str, Any]) -> tuple[WhisperEncoder, tuple]:
    """The encoder and a short example input (the variables do not depend on the frame count)."""
    model = WhisperEncoder(**kwargs)
    return model, (jnp.zeros((1, model.num_mel_bins, 4), jnp.float32),)


def conv1d(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch Conv1d weight `[out, in, k]` -> Flax `[k, in, out]`."""
    return x.transpose(2, 1, 0).reshape(shape)


def key_map(model: WhisperEncoder) -> KeyMap:
    del model  # the key names do not depend on the sizes
    enc = r"(?:model\.encoder\.|encoder\.)?"
    layer = enc + r"layers\.(\d+)\."
    rules = [
        Rule(enc + r"conv([12])\.weight", r"params/conv\1/kernel", conv1d),
        Rule(enc + r"conv([12])\.bias", r"params/conv\1/bias"),
        Rule(enc + r"embed_positions\.weight", "params/embed_positions"),
        Rule(enc + r"layer_norm\.weight", "params/layer_norm/scale"),
        Rule(enc + r"layer_norm\.bias", "params/layer_norm/bias"),
        Rule(layer + r"self_attn_layer_norm\.weight", r"params/layers_\1/norm1/scale"),
        Rule(layer + r"self_attn_layer_norm\.bias", r"params/layers_\1/norm1/bias"),
        Rule(layer + r"final_layer_norm\.weight", r"params/layers_\1/norm2/scale"),
        Rule(layer + r"final_layer_norm\.bias", r"params/layers_\1/norm2/bias"),
        Rule(layer + r"(fc[12])\.weight", r"params/layers_\1/mlp/\2/kernel", linear),
        Rule(layer + r"(fc[12])\.bias", r"params/layers_\1/mlp/\2/bias"),
    ]
    for theirs, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("out_proj", "out")):
        rules.append(Rule(layer + rf"self_attn\.{theirs}\.weight", rf"params/layers_\1/attn/{ours}/kernel", linear))
        # k_proj has no bias in Whisper; a checkpoint with one finds no variable and is refused.
        rules.append(Rule(layer + rf"self_attn\.{theirs}\.bias", rf"params/layers_\1/attn/{ours}/bias", identity))
    return KeyMap(rules=rules, ignore=[Ignore(r"(?:model\.)?decoder\..*|proj_out\..*", _DECODER)])
