"""Original BEATs checkpoints (microsoft/unilm `beats/`, e.g. `BEATs_iter3_plus_AS2M*.pt`) -> `BEATs`.

A checkpoint is a torch file holding a dict: `cfg` (the `BEATsConfig` fields), `model` (the
state dict, which the original loads strictly) and, for fine-tuned ones, `label_dict`.

Two source tensors need another one to convert, so the key map keeps a little state and
relies on the engine visiting keys in sorted order:
- the positional conv is weight-normed (`weight_g` [1, 1, k], `weight_v` [out, in/groups, k],
  dim=2); `weight_g` sorts first and is remembered, and `weight_v` becomes the folded
  kernel g * v / ||v|| (norm over dims 0 and 1). A plain `weight` (weight norm removed) and
  the newer `parametrizations.weight.original0/1` spelling are accepted too.
- every layer lists `self_attn.relative_attention_bias.weight`, but it is one module shared
  by all layers and only layer 0's is used; the other copies must equal layer 0's.
"""
from typing import Any, Mapping

import numpy as np

from jaxaudio.convert.engine import ConversionError, Ignore, KeyMap, Merge, Rule, conv2d, identity, linear
from jaxaudio.models.beats import ACTIVATIONS, BEATs, NUM_MEL_BINS

# BEATsConfig fields that fix the architecture: a checkpoint's cfg must have them.
REQUIRED = ("input_patch_size", "embed_dim", "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
            "encoder_attention_heads", "layer_norm_first", "deep_norm", "conv_pos", "conv_pos_groups",
            "relative_position_embedding", "num_buckets", "max_distance", "gru_rel_pos", "finetuned_model")
# The rest, with BEATsConfig's defaults (which the original falls back to as well).
DEFAULTS = {"conv_bias": False, "activation_fn": "gelu", "layer_wise_gradient_decay_ratio": 1.0, "dropout": 0.1,
            "attention_dropout": 0.1, "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "dropout_input": 0.0,
            "predictor_dropout": 0.1, "predictor_class": 527}
_TYPES = {"layer_norm_first": bool, "deep_norm": bool, "relative_position_embedding": bool, "gru_rel_pos": bool,
          "finetuned_model": bool, "conv_bias": bool, "activation_fn": str,
          "layer_wise_gradient_decay_ratio": float, "dropout": float, "attention_dropout": float,
          "activation_dropout": float, "encoder_layerdrop": float, "dropout_input": float,
          "predictor_dropout": float}


def config_from_checkpoint(cfg: Mapping[str, Any], source: str = "checkpoint cfg") -> dict[str, Any]:
    """`BEATs` keyword arguments from a checkpoint's `cfg` dict."""
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ConversionError(f"{source}: field(s) {missing} missing (BEATsConfig fields that fix the architecture)")
    kwargs = {k: _TYPES.get(k, int)(cfg[k]) for k in REQUIRED}
    kwargs.update({k: _TYPES.get(k, int)(cfg.get(k, d)) for k, d in DEFAULTS.items()})
    if kwargs["activation_fn"] not in ACTIVATIONS:
        raise ConversionError(f"{source}: activation_fn={kwargs['activation_fn']!r} is not supported "
                              f"(one of {sorted(ACTIVATIONS)}; 'glu' has another fc1)")
    if kwargs["deep_norm"] and kwargs["layer_norm_first"]:
        raise ConversionError(f"{source}: deep_norm and layer_norm_first are both set; the original forbids it")
    if NUM_MEL_BINS % kwargs["input_patch_size"]:
        raise ConversionError(f"{source}: input_patch_size={kwargs['input_patch_size']} does not divide "
                              f"{NUM_MEL_BINS} mel bins")
    for a, b in (("encoder_embed_dim", "encoder_attention_heads"), ("encoder_embed_dim", "conv_pos_groups")):
        if kwargs[a] % kwargs[b]:
            raise ConversionError(f"{source}: {a}={kwargs[a]} is not a multiple of {b}={kwargs[b]}")
    return kwargs


def build(kwargs: Mapping[str, Any]) -> tuple[BEATs, tuple]:
    """The module and example `init` arguments (1 s of audio; the variables do not depend on it)."""
    module = BEATs(**dict(kwargs))
    return module, (np.zeros((1, 16000), np.float32),)


def build_from_config(model_cfg: Any) -> tuple[BEATs, tuple]:
    """`build` from a config section (an ml_collections `ConfigDict` or a dict of kwargs)."""
    return build(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)


def _conv1d(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch Conv1d weight `[out, in/groups, k]` -> Flax `[k, in/groups, out]`."""
    return x.transpose(2, 1, 0).reshape(shape)


def _fold_weight_norm(parts: dict[str, np.ndarray]) -> np.ndarray:
    """`weight_norm(dim=2)`: w = g * v / ||v||, the norm over dims 0 and 1 (g is [1, 1, kernel])."""
    g, v = parts["g"].astype(np.float64), parts["v"].astype(np.float64)
    if v.ndim != 3 or g.shape != (1, 1, v.shape[2]):
        raise ValueError(f"weight_g {g.shape} / weight_v {v.shape}: weight norm over dim 2 needs [1, 1, k] / [out, in, k]")
    return (g * v / np.sqrt(np.sum(v * v, axis=(0, 1), keepdims=True))).astype(np.float32)


def key_map(module: BEATs) -> KeyMap:
    """Original state-dict keys -> our variables."""
    layer = r"encoder\.layers\.(\d+)\."
    conv = r"encoder\.pos_conv\.0\."
    rules = [
        Rule(r"patch_embedding\.weight", "params/patch_embedding/kernel", conv2d),
        Rule(r"patch_embedding\.bias", "params/patch_embedding/bias"),
        Rule(r"layer_norm\.weight", "params/layer_norm/scale"),
        Rule(r"layer_norm\.bias", "params/layer_norm/bias"),
        Rule(r"post_extract_proj\.weight", "params/post_extract_proj/kernel", linear),
        Rule(r"post_extract_proj\.bias", "params/post_extract_proj/bias"),
        Rule(conv + r"weight", "params/pos_conv/kernel", _conv1d),
        Rule(conv + r"bias", "params/pos_conv/bias"),
        Rule(r"encoder\.layer_norm\.weight", "params/encoder_layer_norm/scale"),
        Rule(r"encoder\.layer_norm\.bias", "params/encoder_layer_norm/bias"),
        Rule(r"encoder\.layers\.0\.self_attn\.relative_attention_bias\.weight", "params/relative_attention_bias"),
        Rule(layer + r"self_attn\.q_proj\.weight", r"params/layers_\1/self_attn/query/kernel", linear),
        Rule(layer + r"self_attn\.k_proj\.weight", r"params/layers_\1/self_attn/key/kernel", linear),
        Rule(layer + r"self_attn\.v_proj\.weight", r"params/layers_\1/self_attn/value/kernel", linear),
        Rule(layer + r"self_attn\.out_proj\.weight", r"params/layers_\1/self_attn/out/kernel", linear),
        Rule(layer + r"self_attn\.q_proj\.bias", r"params/layers_\1/self_attn/query/bias", identity),
        Rule(layer + r"self_attn\.k_proj\.bias", r"params/layers_\1/self_attn/key/bias", identity),
        Rule(layer + r"self_attn\.v_proj\.bias", r"params/layers_\1/self_attn/value/bias", identity),
        Rule(layer + r"self_attn\.out_proj\.bias", r"params/layers_\1/self_attn/out/bias"),
        Rule(layer + r"self_attn\.grep_linear\.weight", r"params/layers_\1/grep_linear/kernel", linear),
        Rule(layer + r"self_attn\.grep_linear\.bias", r"params/layers_\1/grep_linear/bias"),
        Rule(layer + r"self_attn\.grep_a", r"params/layers_\1/grep_a", identity),
        Rule(layer + r"(self_attn_layer_norm|final_layer_norm)\.weight", r"params/layers_\1/\2/scale"),
        Rule(layer + r"(self_attn_layer_norm|final_layer_norm)\.bias", r"params/layers_\1/\2/bias"),
        Rule(layer + r"(fc1|fc2)\.weight", r"params/layers_\1/\2/kernel", linear),
        Rule(layer + r"(fc1|fc2)\.bias", r"params/layers_\1/\2/bias"),
        Rule(r"predictor\.weight", "params/predictor/kernel", linear),
        Rule(r"predictor\.bias", "params/predictor/bias"),
    ]
    ignore = [
        Ignore(r"encoder\.layers\.[1-9]\d*\.self_attn\.relative_attention_bias\.weight",
               "a copy of layer 0's table (one module shared by all layers)",
               same_as=["encoder.layers.0.self_attn.relative_attention_bias.weight"]),
    ]
    if module.gru_rel_pos and not module.relative_position_embedding:
        ignore.append(Ignore(layer + r"self_attn\.(grep_linear\.weight|grep_linear\.bias|grep_a)",
                             "the gate only scales the relative position bias, which this model has not"))
    # Weight norm, old (`weight_g`/`weight_v`) and new (`parametrizations.weight.original0/1`) spelling.
    merge = [Merge(r"(encoder\.pos_conv\.0\.)weight_(?P<part>g|v)", r"\1weight", ("g", "v"), _fold_weight_norm),
             Merge(r"(encoder\.pos_conv\.0\.)parametrizations\.weight\.original(?P<part>[01])", r"\1weight",
                   ("0", "1"), lambda p: _fold_weight_norm({"g": p["0"], "v": p["1"]}))]
    return KeyMap(rules=rules, ignore=ignore, merge=merge)


def convert_checkpoint(path: str, allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(variables, config)` from an original BEATs checkpoint file (a dict with `cfg`,
    `model` and, fine-tuned, `label_dict`); `config` = `{"model": "beats", "kwargs",
    "label_dict"}`, what `launch/convert.py` saves and `jaxaudio.convert.hf.load_pretrained`
    reads. Files that need full unpickling are refused unless `allow_pickle=True`.
    """
    import flax.linen as nn
    import jax

    from jaxaudio.convert.engine import convert
    from jaxaudio.convert.io import load_checkpoint, tensors_of

    file, ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
    state_dict = tensors_of(ckpt, file, "model")
    if not isinstance(ckpt.get("cfg"), Mapping):
        raise ConversionError(f"{file}: no 'cfg' dict (the BEATsConfig fields); top-level keys: {sorted(ckpt)}")
    kwargs = config_from_checkpoint(ckpt["cfg"], source=f"{file} cfg")
    module, example = build(kwargs)
    expected = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *example))
    variables = convert(state_dict, key_map(module), expected, source_name=file)
    # (json writes the label_dict's int keys as strings)
    return variables, {"model": "beats", "kwargs": kwargs, "label_dict": ckpt.get("label_dict"),
                       "source_tensors": len(state_dict)}


def load_beats_checkpoint(path: str, allow_pickle: bool = False) -> tuple[BEATs, dict[str, Any], Any]:
    """`(module, variables, label_dict)` from an original BEATs checkpoint file."""
    variables, config = convert_checkpoint(path, allow_pickle)
    module, _ = build(config["kwargs"])
    return module, variables, config["label_dict"]
