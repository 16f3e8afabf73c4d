"""Hugging Face AST checkpoints (`ASTModel`, `ASTForAudioClassification`) -> `jaxaudio.models.ast.AST`.

Keys as `save_pretrained` writes them (and as the hub's MIT/ast-* checkpoints hold them):
`embeddings.*`, `encoder.layer.N.*`, `layernorm.*`, all under `audio_spectrogram_transformer.`
in the classifier, which adds `classifier.layernorm.*` and `classifier.dense.*`.
"""
from typing import Any

import jax.numpy as jnp

from jaxaudio.convert.engine import ConversionError, KeyMap, Rule, conv2d, identity, linear
from jaxaudio.convert.hf import hf_field
from jaxaudio.models.ast import AST

HF_MODEL_TYPES = ("audio-spectrogram-transformer",)

# Hugging Face `hidden_act` -> our activation names.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                "silu": "silu", "swish": "silu"}


def _num_labels(hf: dict[str, Any]) -> int:
    """The head's size for a classifier checkpoint, 0 for the bare encoder.

    Every HF config carries `id2label` (two dummy labels by default), so only
    `architectures` tells whether the weights hold a head.
    """
    architectures = hf.get("architectures") or []
    if not any(a.endswith("ForAudioClassification") for a in architectures):
        return 0
    if "id2label" in hf:
        return len(hf["id2label"])
    return int(hf_field(hf, "num_labels"))


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    act = hf_field(hf, "hidden_act")
    if act not in _ACTIVATIONS:
        raise ConversionError(f"config.json: hidden_act={act!r} is not supported (one of {sorted(_ACTIVATIONS)})")
    patch = hf_field(hf, "patch_size")
    if isinstance(patch, (list, tuple)):  # HF builds a square kernel from it either way
        if len(set(patch)) != 1:
            raise ConversionError(f"config.json: patch_size={patch} is not supported (square patches only)")
        patch = patch[0]
    if not hf.get("qkv_bias", True):
        raise ConversionError("config.json: qkv_bias=false is not supported (the attention has biases)")
    kwargs = {
        "hidden_size": int(hf_field(hf, "hidden_size")),
        "num_hidden_layers": int(hf_field(hf, "num_hidden_layers")),
        "num_attention_heads": int(hf_field(hf, "num_attention_heads")),
        "intermediate_size": int(hf_field(hf, "intermediate_size")),
        "hidden_act": _ACTIVATIONS[act],
        "layer_norm_eps": float(hf_field(hf, "layer_norm_eps")),
        "patch_size": int(patch),
        "frequency_stride": int(hf_field(hf, "frequency_stride")),
        "time_stride": int(hf_field(hf, "time_stride")),
        "max_length": int(hf_field(hf, "max_length")),
        "num_mel_bins": int(hf_field(hf, "num_mel_bins")),
        "num_labels": _num_labels(hf),
        "dropout": float(hf.get("hidden_dropout_prob", 0.0)),
    }
    if kwargs["hidden_size"] % kwargs["num_attention_heads"]:
        raise ConversionError(f"config.json: hidden_size={kwargs['hidden_size']} is not a multiple of "
                              f"num_attention_heads={kwargs['num_attention_heads']}")
    if min(kwargs["num_mel_bins"], kwargs["max_length"]) < kwargs["patch_size"]:
        raise ConversionError(f"config.json: patch_size={kwargs['patch_size']} exceeds num_mel_bins="
                              f"{kwargs['num_mel_bins']} or max_length={kwargs['max_length']}")
    return kwargs


def build(kwargs: dict[str, Any]) -> tuple[AST, tuple]:
    module = AST(**kwargs)
    return module, (jnp.zeros((1, module.max_length, module.num_mel_bins), jnp.float32),)


def key_map(module: AST) -> KeyMap:
    del module  # every size is checked against the module's variables by the engine
    base = r"(?:audio_spectrogram_transformer\.)?"
    layer = base + r"encoder\.layer\.(\d+)\."
    return KeyMap(rules=[
        Rule(base + r"embeddings\.(cls_token|distillation_token|position_embeddings)", r"params/\1", identity),
        Rule(base + r"embeddings\.patch_embeddings\.projection\.weight", "params/patch_embeddings/kernel", conv2d),
        Rule(base + r"embeddings\.patch_embeddings\.projection\.bias", "params/patch_embeddings/bias"),
        Rule(layer + r"layernorm_before\.weight", r"params/layer_\1/norm1/scale"),
        Rule(layer + r"layernorm_before\.bias", r"params/layer_\1/norm1/bias"),
        Rule(layer + r"attention\.attention\.(query|key|value)\.weight", r"params/layer_\1/attn/\2/kernel", linear),
        Rule(layer + r"attention\.attention\.(query|key|value)\.bias", r"params/layer_\1/attn/\2/bias", identity),
        Rule(layer + r"attention\.output\.dense\.weight", r"params/layer_\1/attn/out/kernel", linear),
        Rule(layer + r"attention\.output\.dense\.bias", r"params/layer_\1/attn/out/bias"),
        Rule(layer + r"layernorm_after\.weight", r"params/layer_\1/norm2/scale"),
        Rule(layer + r"layernorm_after\.bias", r"params/layer_\1/norm2/bias"),
        Rule(layer + r"intermediate\.dense\.weight", r"params/layer_\1/mlp/fc1/kernel", linear),
        Rule(layer + r"intermediate\.dense\.bias", r"params/layer_\1/mlp/fc1/bias"),
        Rule(layer + r"output\.dense\.weight", r"params/layer_\1/mlp/fc2/kernel", linear),
        Rule(layer + r"output\.dense\.bias", r"params/layer_\1/mlp/fc2/bias"),
        Rule(base + r"layernorm\.weight", "params/layernorm/scale"),
        Rule(base + r"layernorm\.bias", "params/layernorm/bias"),
        Rule(r"classifier\.layernorm\.weight", "params/classifier_layernorm/scale"),
        Rule(r"classifier\.layernorm\.bias", "params/classifier_layernorm/bias"),
        Rule(r"classifier\.dense\.weight", "params/classifier/kernel", linear),
        Rule(r"classifier\.dense\.bias", "params/classifier/bias"),
    ])
