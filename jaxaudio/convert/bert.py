"""Hugging Face BERT (`BertModel`, `BertForMaskedLM`, `BertForTokenClassification`,
`BertForPreTraining`) -> `jaxaudio.models.bert.Bert`.

The head comes from `architectures[0]`. Encoder keys may carry the `bert.` prefix (the
task models) or not (`BertModel`). `BertModel` has a pooler unless the checkpoint was
saved with `add_pooling_layer=False`, which config.json does not record: such a
checkpoint fails with the pooler's variables listed as missing; add
`"add_pooling_layer": false` to its config.json to convert it without one.
"""
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxaudio.convert.engine import ConversionError, Ignore, KeyMap, Rule, linear
from jaxaudio.convert.hf import hf_field
from jaxaudio.convert.peft import ModuleNames
from jaxaudio.models.bert import Bert

HF_MODEL_TYPES = ("bert",)

# LoRA-adaptable layers (`convert/peft.py`), named as in the task models (`BertForMaskedLM`,
# `BertForTokenClassification`: the encoder under `bert.`). AudioBERT adapts query/key/value.
# PEFT's `target_modules=["dense"]` would also wrap the MLM head's transform, which is not
# listed here: such an adapter is refused with that key named.
MODULE_NAMES = ModuleNames((
    ("layers_{n}/attention/query", "bert.encoder.layer.{n}.attention.self.query"),
    ("layers_{n}/attention/key", "bert.encoder.layer.{n}.attention.self.key"),
    ("layers_{n}/attention/value", "bert.encoder.layer.{n}.attention.self.value"),
    ("layers_{n}/attention/out", "bert.encoder.layer.{n}.attention.output.dense"),
    ("layers_{n}/intermediate", "bert.encoder.layer.{n}.intermediate.dense"),
    ("layers_{n}/output", "bert.encoder.layer.{n}.output.dense"),
))

# architectures[0] -> (head, pooler)
ARCHITECTURES = {
    "BertModel": ("none", True),
    "BertForMaskedLM": ("mlm", False),
    "BertForPreTraining": ("mlm", True),  # its next-sentence head is dropped
    "BertForTokenClassification": ("token_classification", False),
}

# Hugging Face's `hidden_act` -> ours. gelu_new / gelu_fast / gelu_pytorch_tanh are all the
# tanh approximation.
HIDDEN_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu"}


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """`Bert` kwargs from a BERT config.json."""
    position = hf.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise ConversionError(f"config.json: position_embedding_type={position!r} is not supported "
                              "(only 'absolute'; relative_key / relative_key_query need relative-position "
                              "attention scores)")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf.get(flag):
            raise ConversionError(f"config.json: {flag}=true is not supported (bidirectional encoder only)")
    archs = hf.get("architectures") or ["BertModel"]
    if archs[0] not in ARCHITECTURES:
        raise ConversionError(f"config.json: architecture {archs[0]!r} is not supported; "
                              f"choose one of {sorted(ARCHITECTURES)}")
    head, pooler = ARCHITECTURES[archs[0]]
    pooler = bool(hf.get("add_pooling_layer", pooler))
    act = hf.get("hidden_act", "gelu")
    if act not in HIDDEN_ACTS:
        raise ConversionError(f"config.json: hidden_act={act!r} is not supported; choose one of {sorted(HIDDEN_ACTS)}")
    if head == "mlm" and not hf.get("tie_word_embeddings", True):
        raise ConversionError("config.json: tie_word_embeddings=false; the MLM decoder here is always the word "
                              "embedding matrix")
    kwargs = dict(
        vocab_size=int(hf_field(hf, "vocab_size")),
        hidden_size=int(hf_field(hf, "hidden_size")),
        num_layers=int(hf_field(hf, "num_hidden_layers")),
        num_heads=int(hf_field(hf, "num_attention_heads")),
        intermediate_size=int(hf_field(hf, "intermediate_size")),
        hidden_act=HIDDEN_ACTS[act],
        max_position_embeddings=int(hf_field(hf, "max_position_embeddings")),
        type_vocab_size=int(hf_field(hf, "type_vocab_size")),
        eps=float(hf.get("layer_norm_eps", 1e-12)),
        dropout=float(hf.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
        pooler=pooler,
        head=head,
    )
    if kwargs["hidden_size"] % kwargs["num_heads"]:
        raise ConversionError(f"config.json: hidden_size={kwargs['hidden_size']} is not a multiple of "
                              f"num_attention_heads={kwargs['num_heads']}")
    if head == "token_classification":
        labels = hf.get("id2label")
        kwargs["num_labels"] = len(labels) if labels else int(hf_field(hf, "num_labels"))
        if hf.get("classifier_dropout") is not None:
            kwargs["classifier_dropout"] = float(hf["classifier_dropout"])
    return kwargs


def build(kwargs: dict[str, Any]) -> tuple[Bert, tuple]:
    return Bert(**kwargs), (jnp.zeros((1, 4), jnp.int32),)


def _is_arange(x: np.ndarray) -> str | None:
    if not np.array_equal(x.reshape(-1), np.arange(x.size)):
        return "not 0, 1, 2, ...: the default positions here are, so this checkpoint would run differently"
    return None


def key_map(model: Bert) -> KeyMap:
    del model  # one map fits every size and head; the engine checks the shapes
    p = r"(?:bert\.)?"
    layer = p + r"encoder\.layer\.(\d+)\."
    to = r"params/layers_\1/"
    return KeyMap(
        rules=[
            Rule(p + r"embeddings\.word_embeddings\.weight", "params/embeddings/word_embeddings"),
            Rule(p + r"embeddings\.(position_embeddings|token_type_embeddings)\.weight", r"params/embeddings/\1"),
            Rule(p + r"embeddings\.LayerNorm\.weight", "params/embeddings/norm/scale"),
            Rule(p + r"embeddings\.LayerNorm\.bias", "params/embeddings/norm/bias"),
            Rule(layer + r"attention\.self\.(query|key|value)\.weight", to + r"attention/\2/kernel", linear),
            Rule(layer + r"attention\.self\.(query|key|value)\.bias", to + r"attention/\2/bias"),
            Rule(layer + r"attention\.output\.dense\.weight", to + "attention/out/kernel", linear),
            Rule(layer + r"attention\.output\.dense\.bias", to + "attention/out/bias"),
            Rule(layer + r"attention\.output\.LayerNorm\.weight", to + "attention_norm/scale"),
            Rule(layer + r"attention\.output\.LayerNorm\.bias", to + "attention_norm/bias"),
            Rule(layer + r"(intermediate|output)\.dense\.weight", to + r"\2/kernel", linear),
            Rule(layer + r"(intermediate|output)\.dense\.bias", to + r"\2/bias"),
            Rule(layer + r"output\.LayerNorm\.weight", to + "output_norm/scale"),
            Rule(layer + r"output\.LayerNorm\.bias", to + "output_norm/bias"),
            Rule(p + r"pooler\.dense\.weight", "params/pooler/kernel", linear),
            Rule(p + r"pooler\.dense\.bias", "params/pooler/bias"),
            Rule(r"cls\.predictions\.transform\.dense\.weight", "params/mlm/transform/kernel", linear),
            Rule(r"cls\.predictions\.transform\.dense\.bias", "params/mlm/transform/bias"),
            Rule(r"cls\.predictions\.transform\.LayerNorm\.weight", "params/mlm/transform_norm/scale"),
            Rule(r"cls\.predictions\.transform\.LayerNorm\.bias", "params/mlm/transform_norm/bias"),
            Rule(r"cls\.predictions\.bias", "params/mlm/bias"),
            Rule(r"classifier\.weight", "params/classifier/kernel", linear),
            Rule(r"classifier\.bias", "params/classifier/bias"),
        ],
        ignore=[
            Ignore(r"cls\.predictions\.decoder\.weight", "the MLM decoder is the word embedding matrix (tied)",
                   same_as=["bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"]),
            Ignore(r"cls\.predictions\.decoder\.bias", "the MLM decoder's bias is cls.predictions.bias (tied)",
                   same_as=["cls.predictions.bias"]),
            Ignore(p + r"embeddings\.position_ids", "buffer: 0..max_position_embeddings-1, the default positions",
                   _is_arange),
            Ignore(p + r"embeddings\.token_type_ids", "buffer of zeros: the default token types"),
            Ignore(r"cls\.seq_relationship\.(weight|bias)",
                   "BertForPreTraining's next-sentence-prediction head, not part of this model"),
        ],
    )
