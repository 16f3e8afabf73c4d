"""Q-Former checkpoints -> `jaxaudio.models.qformer`.

Three sources, one set of layer rules:
  (a) Hugging Face `Blip2QFormerModel` (`save_pretrained`; model_type `blip_2_qformer`)
      -> `QFormer` (`HF_MODEL_TYPES`, `config_from_hf`, `build`, `key_map`).
  (b) SALMONN's checkpoint (`salmonn_v1.pth`, `ckpt['model']`; LAVIS Q-Former names,
      `attention.self.*`) -> `SalmonnConnector` (`salmonn_key_map`).
  (c) BAT's released trainable parameters (SLAM-LLM `model.pt`, `encoder_projector.*`;
      Hugging Face Q-Former names, `attention.attention.*`) -> `BatProjector` (`bat_key_map`).

The SALMONN and BAT checkpoints also hold the LLM's LoRA adapters. Their maps ignore
them by default (`ignore_llm_adapters=True`); a system converter that maps the adapters
itself builds the map with `ignore_llm_adapters=False` and adds its own rules, since an
`Ignore` takes precedence over any `Rule` in the engine. Targets can be placed under
any path (`prefix`) so a system model can hold these modules as sub-modules.
"""
from typing import Any

import jax.numpy as jnp

from jaxaudio.convert.bert import HIDDEN_ACTS
from jaxaudio.convert.engine import ConversionError, Ignore, KeyMap, Rule, identity, linear
from jaxaudio.convert.hf import hf_field
from jaxaudio.models.qformer import QFormer

HF_MODEL_TYPES = ("blip_2_qformer",)
LLM_ADAPTERS = "LLM adapters: imported by the {} system converter"


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """`QFormer` kwargs from a `Blip2QFormerConfig` config.json."""
    act = hf.get("hidden_act", "gelu")
    if act not in HIDDEN_ACTS:
        raise ConversionError(f"config.json: hidden_act={act!r} is not supported; choose one of {sorted(HIDDEN_ACTS)}")
    kwargs = dict(
        hidden_size=int(hf_field(hf, "hidden_size")),
        num_layers=int(hf_field(hf, "num_hidden_layers")),
        num_heads=int(hf_field(hf, "num_attention_heads")),
        intermediate_size=int(hf_field(hf, "intermediate_size")),
        encoder_hidden_size=int(hf_field(hf, "encoder_hidden_size")),
        cross_attention_frequency=int(hf_field(hf, "cross_attention_frequency")),
        hidden_act=HIDDEN_ACTS[act],
        eps=float(hf.get("layer_norm_eps", 1e-12)),
        dropout=float(hf.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
    )
    if kwargs["hidden_size"] % kwargs["num_heads"]:
        raise ConversionError(f"config.json: hidden_size={kwargs['hidden_size']} is not a multiple of "
                              f"num_attention_heads={kwargs['num_heads']}")
    if kwargs["cross_attention_frequency"] < 1:
        raise ConversionError(f"config.json: cross_attention_frequency={kwargs['cross_attention_frequency']} "
                              "must be at least 1")
    return kwargs


def build(kwargs: dict[str, Any]) -> tuple[QFormer, tuple]:
    module = QFormer(**kwargs)
    return module, (jnp.zeros((1, 2, module.hidden_size)), jnp.zeros((1, 3, module.encoder_hidden_size)))


def layer_rules(src: str, attention: str, dst: str) -> list[Rule]:
    """Rules for `{src}layer.N.*` -> `{dst}layers_N/*`; `attention` is the name of the
    projections' holder inside `attention`/`crossattention` (`attention` in Hugging
    Face's BLIP-2, `self` in LAVIS/SALMONN)."""
    layer = src + r"layer\.(\d+)\."
    to = dst + r"layers_\1/"
    rules = []
    for block in ("attention", "crossattention"):
        at = layer + block + r"\."
        rules += [
            Rule(at + attention + r"\.(query|key|value)\.weight", to + block + r"/\2/kernel", linear),
            Rule(at + attention + r"\.(query|key|value)\.bias", to + block + r"/\2/bias"),
            Rule(at + r"output\.dense\.weight", to + block + "/out/kernel", linear),
            Rule(at + r"output\.dense\.bias", to + block + "/out/bias"),
            Rule(at + r"output\.LayerNorm\.weight", to + block + "_norm/scale"),
            Rule(at + r"output\.LayerNorm\.bias", to + block + "_norm/bias"),
        ]
    return rules + [
        Rule(layer + r"(intermediate_query|output_query)\.dense\.weight", to + r"\2/kernel", linear),
        Rule(layer + r"(intermediate_query|output_query)\.dense\.bias", to + r"\2/bias"),
        Rule(layer + r"output_query\.LayerNorm\.weight", to + "output_query_norm/scale"),
        Rule(layer + r"output_query\.LayerNorm\.bias", to + "output_query_norm/bias"),
    ]


def _text_ffn(layer: str) -> Ignore:
    return Ignore(layer + r"layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)",
                  "the text feed-forward: only query tokens pass through here (they use intermediate_query/"
                  "output_query)")


def hf_rules(src: str = "", dst: str = "params/") -> tuple[list[Rule], list[Ignore]]:
    """Hugging Face `Blip2QFormerModel` keys under `src` -> a `QFormer` under `dst`."""
    rules = [Rule(src + r"layernorm\.weight", dst + "layernorm/scale"),
             Rule(src + r"layernorm\.bias", dst + "layernorm/bias")]
    return rules + layer_rules(src + r"encoder\.", "attention", dst), [_text_ffn(src + r"encoder\.")]


def key_map(model: QFormer) -> KeyMap:
    """Hugging Face `Blip2QFormerModel` -> `QFormer`."""
    del model  # one map fits every size; the engine checks shapes and which layers cross-attend
    rules, ignore = hf_rules()
    return KeyMap(rules=rules, ignore=ignore)


def _tokens(x, shape):
    """`[1, queries, hidden]` (a torch Parameter with a batch axis) -> `[queries, hidden]`."""
    if x.ndim != 3 or x.shape[0] != 1:
        raise ValueError("expected [1, queries, hidden]")
    return identity(x, shape)


def bat_key_map(prefix: str = "params/", ignore_llm_adapters: bool = True) -> KeyMap:
    """BAT's trainable parameters (`encoder_projector.{query, qformer.*, linear, norm}`)
    -> a `BatProjector` whose variables sit under `prefix`."""
    src = r"encoder_projector\."
    rules, ignore = hf_rules(src + r"qformer\.", prefix + "qformer/")
    rules += [
        Rule(src + r"query", prefix + "query", _tokens),
        Rule(src + r"linear\.weight", prefix + "linear/kernel", linear),
        Rule(src + r"linear\.bias", prefix + "linear/bias"),
        Rule(src + r"norm\.weight", prefix + "norm/scale"),
        Rule(src + r"norm\.bias", prefix + "norm/bias"),
    ]
    if ignore_llm_adapters:
        ignore.append(Ignore(r"llm\..*lora_[AB](\.default)?\.weight", LLM_ADAPTERS.format("BAT")))
    return KeyMap(rules=rules, ignore=ignore)


def salmonn_key_map(prefix: str = "params/window_qformer/", fusion_prefix: str = "params/fusion/",
                    ignore_llm_adapters: bool = True) -> KeyMap:
    """SALMONN's checkpoint (`speech_Qformer.bert.*`, `speech_query_tokens`,
    `speech_llama_proj`, `ln_speech`, `ln_audio`) -> a `WindowQFormer` under `prefix` and
    an `AuditoryFusion` under `fusion_prefix` (the defaults fit `SalmonnConnector`).

    SALMONN builds a LAVIS `BertLMHeadModel` and sets its text parts to None; a checkpoint
    may still hold them (and the `position_ids` buffer), so they are ignored.
    """
    bert = r"speech_Qformer\.bert\."
    qformer = prefix + "speech_qformer/"
    rules = [
        Rule(bert + r"embeddings\.LayerNorm\.weight", qformer + "layernorm/scale"),
        Rule(bert + r"embeddings\.LayerNorm\.bias", qformer + "layernorm/bias"),
        *layer_rules(bert + r"encoder\.", "self", qformer),
        Rule(r"speech_query_tokens", prefix + "speech_query_tokens", _tokens),
        Rule(r"speech_llama_proj\.weight", prefix + "speech_llama_proj/kernel", linear),
        Rule(r"speech_llama_proj\.bias", prefix + "speech_llama_proj/bias"),
        Rule(r"(ln_speech|ln_audio)\.weight", fusion_prefix + r"\1/scale"),
        Rule(r"(ln_speech|ln_audio)\.bias", fusion_prefix + r"\1/bias"),
    ]
    ignore = [
        Ignore(bert + r"embeddings\.(word_embeddings|position_embeddings)\.weight",
               "text embeddings: SALMONN sets them to None (query tokens only)"),
        Ignore(bert + r"embeddings\.position_ids", "buffer of the text position embeddings, which SALMONN drops"),
        _text_ffn(bert + r"encoder\."),
        Ignore(r"speech_Qformer\.cls\..*", "BertLMHeadModel's MLM head: SALMONN sets it to None"),
        Ignore(r"llama_model\..*rotary_emb\.inv_freq",
               "LLaMA's rotary frequency buffer (persistent in transformers 4.28): recomputed by the LLM"),
    ]
    if ignore_llm_adapters:
        ignore.append(Ignore(r"llama_model\..*lora_[AB](\.default)?\.weight", LLM_ADAPTERS.format("SALMONN")))
    return KeyMap(rules=rules, ignore=ignore)
