"""CLAP checkpoints -> `jaxaudio.models.clap.Clap`, from two layouts:

- Hugging Face `ClapModel` (`save_pretrained` folders, `laion/clap-htsat-{fused,unfused}`;
  `model_type` "clap"): `config_from_hf`, `build`, `key_map`, through `convert.hf`.
- The original LAION-CLAP training checkpoints (`630k-audioset-fusion-best.pt` and kin: a
  dict whose `state_dict` holds `module.`-prefixed keys `text_branch.*` (RoBERTa names),
  `audio_branch.*` (htsat.py names), `{text,audio}_projection.{0,2}`, `logit_scale_{a,t}`):
  `convert_laion`, whose sizes come from the arguments (the file carries no config).

Both maps are written once (`_rules`) over the two sets of source names (reference/clap.md
§1 lists the renames). The engine maps one source tensor to one variable, so LAION's fused
`attn.qkv` `[3d, d]` (and its bias) is first split into `attn.qkv.{query,key,value}` rows.
"""
import math
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxaudio.convert import bert as bert_convert
from jaxaudio.convert.engine import ConversionError, Ignore, KeyMap, Rule, conv2d, identity, linear
from jaxaudio.models.clap import HTSAT_BASE, HTSAT_TINY, Clap, relative_position_index

HF_MODEL_TYPES = ("clap",)

# HF ClapAudioConfig / ClapTextConfig defaults: the hub's config.json only holds what differs.
AUDIO_DEFAULTS = dict(window_size=8, num_mel_bins=64, spec_size=256, hidden_act="gelu", patch_size=4,
                      patch_stride=[4, 4], hidden_size=768, depths=[2, 2, 6, 2], num_attention_heads=[4, 8, 16, 32],
                      enable_fusion=False, hidden_dropout_prob=0.1, fusion_type=None, patch_embed_input_channels=1,
                      flatten_patch_embeds=True, patch_embeds_hidden_size=96, enable_patch_layer_norm=True,
                      drop_path_rate=0.0, attention_probs_dropout_prob=0.0, qkv_bias=True, mlp_ratio=4.0,
                      aff_block_r=4, layer_norm_eps=1e-5)
TEXT_DEFAULTS = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1, max_position_embeddings=514, type_vocab_size=1,
                     layer_norm_eps=1e-12, pad_token_id=1, position_embedding_type="absolute")
AUDIO_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
              "silu": "silu", "swish": "silu"}
# LAION's text tower is `RobertaModel.from_pretrained('roberta-base')`: roberta-base's sizes,
# whose LayerNorm eps is 1e-5 (HF's ClapTextConfig says 1e-12).
ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                    hidden_act="gelu", max_position_embeddings=514, type_vocab_size=1, eps=1e-5, dropout=0.1,
                    attention_dropout=0.1, pooler=True, head="none")
LAION_AUDIO = {"HTSAT-tiny": HTSAT_TINY, "HTSAT-base": HTSAT_BASE}
LAION_ISSUE = "LAION-AI/CLAP#113: enable_fusion must match the checkpoint"


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"config.json: audio_config.{name}={value} is not supported (square only)")
        value = value[0]
    return int(value)


def audio_config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """`HTSAT` kwargs from an HF `audio_config`."""
    a = {**AUDIO_DEFAULTS, **hf}
    if a["hidden_act"] not in AUDIO_ACTS:
        raise ConversionError(f"config.json: audio_config.hidden_act={a['hidden_act']!r} is not supported "
                              f"(one of {sorted(AUDIO_ACTS)})")
    if a["enable_fusion"] and a["fusion_type"] == "channel_map":
        raise ConversionError("config.json: audio_config.fusion_type='channel_map' is not supported (the "
                              "released fused checkpoints use the AFF block, fusion_type null / 'aff_2d')")
    if int(a["patch_embed_input_channels"]) != 1 or not a["flatten_patch_embeds"]:
        raise ConversionError("config.json: audio_config needs patch_embed_input_channels=1 and "
                              "flatten_patch_embeds=true")
    if not a["qkv_bias"]:
        raise ConversionError("config.json: audio_config.qkv_bias=false is not supported")
    patch, stride = _square(a["patch_size"], "patch_size"), a["patch_stride"]
    stride = [stride, stride] if isinstance(stride, int) else list(stride)
    if stride != [patch, patch]:
        raise ConversionError(f"config.json: audio_config.patch_stride={stride} differs from patch_size={patch} "
                              "(overlapping patches are not supported)")
    kwargs = dict(num_mel_bins=int(a["num_mel_bins"]), spec_size=int(a["spec_size"]), patch_size=patch,
                  patch_stride=[patch, patch], embed_dim=int(a["patch_embeds_hidden_size"]),
                  depths=[int(d) for d in a["depths"]], num_heads=[int(h) for h in a["num_attention_heads"]],
                  window_size=int(a["window_size"]), mlp_ratio=float(a["mlp_ratio"]), qkv_bias=True,
                  hidden_act=AUDIO_ACTS[a["hidden_act"]], eps=float(a["layer_norm_eps"]),
                  enable_fusion=bool(a["enable_fusion"]), aff_block_r=int(a["aff_block_r"]),
                  enable_patch_layer_norm=bool(a["enable_patch_layer_norm"]),
                  drop_path_rate=float(a["drop_path_rate"]), dropout=float(a["hidden_dropout_prob"]),
                  attention_dropout=float(a["attention_probs_dropout_prob"]))
    width = kwargs["embed_dim"] * 2 ** (len(kwargs["depths"]) - 1)
    if int(a["hidden_size"]) != width:
        raise ConversionError(f"config.json: audio_config.hidden_size={a['hidden_size']} but the encoder ends at "
                              f"patch_embeds_hidden_size * 2**(stages-1) = {width}")
    return kwargs


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """`Clap` kwargs from a `ClapModel` config.json."""
    act = hf.get("projection_hidden_act", "relu")
    if act != "relu":
        raise ConversionError(f"config.json: projection_hidden_act={act!r} is not supported (only 'relu')")
    text_hf = {**TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    text = bert_convert.config_from_hf({**text_hf, "model_type": "bert", "architectures": ["BertModel"],
                                        "add_pooling_layer": True})
    return dict(audio=audio_config_from_hf(hf.get("audio_config") or {}), text=text,
                projection_dim=int(hf.get("projection_dim", 512)),
                logit_scale_init=math.log(float(hf.get("logit_scale_init_value", 1 / 0.07))),
                pad_token_id=int(text_hf["pad_token_id"]))


def build(kwargs: dict[str, Any]) -> tuple[Clap, tuple]:
    """The module and `init` arguments: a full-length input, so no resize runs at init."""
    module = Clap(**kwargs)
    audio, _ = module.parts()
    channels = 4 if audio.enable_fusion else 1
    frames = audio.spec_size * audio.freq_ratio
    return module, (jnp.zeros((1, channels, frames, audio.num_mel_bins), jnp.float32), jnp.zeros((1,), bool),
                    jnp.zeros((1, 4), jnp.int32))


def _conv1x1(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Conv2d 1x1 weight `[out, in, 1, 1]` -> dense kernel `[in, out]`."""
    if x.ndim != 4 or x.shape[2:] != (1, 1):
        raise ValueError("not a 1x1 conv")
    return x[:, :, 0, 0].T.reshape(shape)


def _check_index(x: np.ndarray) -> str | None:
    window = math.isqrt(int(math.isqrt(x.size)))
    if x.ndim != 2 or x.shape != (window ** 2, window ** 2) or not np.array_equal(x, relative_position_index(window)):
        return "not Swin's relative_position_index for a square window: this model computes that one"
    return None


def _check_arange(x: np.ndarray) -> str | None:
    if not np.array_equal(x.reshape(-1), np.arange(x.size)):
        return "not 0, 1, 2, ...: a checkpoint with other position ids would run differently here"
    return None


# Source names of the parts that differ between the two layouts.
HF_NAMES = dict(text=r"text_model\.", audio=r"audio_model\.audio_encoder\.", batch_norm="batch_norm",
                norm1="layernorm_before", norm2="layernorm_after", attention=r"attention\.self\.(query|key|value)",
                table=r"attention\.self\.relative_position_bias_table",
                index=r"attention\.self\.relative_position_index", out=r"attention\.output\.dense",
                fc1=r"intermediate\.dense", fc2=r"output\.dense",
                projection=(("linear1", "1"), ("linear2", "2")))
LAION_NAMES = dict(text=r"(?:module\.)?text_branch\.", audio=r"(?:module\.)?audio_branch\.", batch_norm="bn0",
                   norm1="norm1", norm2="norm2", attention=r"attn\.qkv\.(query|key|value)",
                   table=r"attn\.relative_position_bias_table", index=r"attn\.relative_position_index",
                   out=r"attn\.proj", fc1=r"mlp\.fc1", fc2=r"mlp\.fc2",
                   projection=(("0", "1"), ("2", "2")))  # Sequential(Linear, ReLU, Linear)
# Sequential indices of the AFF branches: (conv1, bn1, conv2, bn2).
AFF_INDICES = {"local_att": (0, 1, 3, 4), "global_att": (1, 2, 4, 5)}


def _rules(n: dict[str, str], top: str) -> tuple[list[Rule], list[Ignore]]:
    """Rules and ignores shared by both layouts, over source names `n`; `top` prefixes the
    projection heads and the logit scales (LAION's `module.`)."""
    a, block = n["audio"], n["audio"] + r"layers\.(\d+)\.blocks\.(\d+)\."
    to_block = r"params/audio/layers_\1_blocks_\2/"
    rules = [
        Rule(a + n["batch_norm"] + r"\.weight", "params/audio/batch_norm/scale"),
        Rule(a + n["batch_norm"] + r"\.bias", "params/audio/batch_norm/bias"),
        Rule(a + n["batch_norm"] + r"\.running_mean", "batch_stats/audio/batch_norm/mean"),
        Rule(a + n["batch_norm"] + r"\.running_var", "batch_stats/audio/batch_norm/var"),
        Rule(a + r"patch_embed\.(proj|mel_conv2d)\.weight", r"params/audio/patch_embed/\1/kernel", conv2d),
        Rule(a + r"patch_embed\.(proj|mel_conv2d)\.bias", r"params/audio/patch_embed/\1/bias"),
        Rule(a + r"patch_embed\.norm\.weight", "params/audio/patch_embed/norm/scale"),
        Rule(a + r"patch_embed\.norm\.bias", "params/audio/patch_embed/norm/bias"),
        Rule(block + n["norm1"] + r"\.weight", to_block + "norm1/scale"),
        Rule(block + n["norm1"] + r"\.bias", to_block + "norm1/bias"),
        Rule(block + n["attention"] + r"\.weight", to_block + r"attn/\3/kernel", linear),
        Rule(block + n["attention"] + r"\.bias", to_block + r"attn/\3/bias"),
        Rule(block + n["table"], to_block + "relative_position_bias_table"),
        Rule(block + n["out"] + r"\.weight", to_block + "attn/out/kernel", linear),
        Rule(block + n["out"] + r"\.bias", to_block + "attn/out/bias"),
        Rule(block + n["norm2"] + r"\.weight", to_block + "norm2/scale"),
        Rule(block + n["norm2"] + r"\.bias", to_block + "norm2/bias"),
        Rule(block + n["fc1"] + r"\.weight", to_block + "mlp/fc1/kernel", linear),
        Rule(block + n["fc1"] + r"\.bias", to_block + "mlp/fc1/bias"),
        Rule(block + n["fc2"] + r"\.weight", to_block + "mlp/fc2/kernel", linear),
        Rule(block + n["fc2"] + r"\.bias", to_block + "mlp/fc2/bias"),
        Rule(a + r"layers\.(\d+)\.downsample\.norm\.weight", r"params/audio/layers_\1_downsample/norm/scale"),
        Rule(a + r"layers\.(\d+)\.downsample\.norm\.bias", r"params/audio/layers_\1_downsample/norm/bias"),
        Rule(a + r"layers\.(\d+)\.downsample\.reduction\.weight", r"params/audio/layers_\1_downsample/reduction/kernel",
             linear),
        Rule(a + r"norm\.weight", "params/audio/norm/scale"),
        Rule(a + r"norm\.bias", "params/audio/norm/bias"),
        Rule(top + r"(logit_scale_[at])", r"params/\1"),
    ]
    for kind, fn, leaf in (("weight", linear, "kernel"), ("bias", identity, "bias")):
        for src, ours in n["projection"]:
            rules.append(Rule(top + r"(audio|text)_projection\." + src + r"\." + kind,
                              rf"params/\1_projection/linear{ours}/{leaf}", fn))
    fusion = a + r"patch_embed\.fusion_model\."
    for branch, (c1, b1, c2, b2) in AFF_INDICES.items():
        for idx, ours in ((c1, "conv1"), (c2, "conv2")):
            rules.append(Rule(fusion + rf"{branch}\.{idx}\.weight", f"params/audio/patch_embed/fusion_model/{branch}/"
                              f"{ours}/kernel", _conv1x1))
            rules.append(Rule(fusion + rf"{branch}\.{idx}\.bias", f"params/audio/patch_embed/fusion_model/{branch}/"
                              f"{ours}/bias"))
        for idx, ours in ((b1, "bn1"), (b2, "bn2")):
            path = f"patch_embed/fusion_model/{branch}/{ours}"
            rules += [Rule(fusion + rf"{branch}\.{idx}\.weight", f"params/audio/{path}/scale"),
                      Rule(fusion + rf"{branch}\.{idx}\.bias", f"params/audio/{path}/bias"),
                      Rule(fusion + rf"{branch}\.{idx}\.running_mean", f"batch_stats/audio/{path}/mean"),
                      Rule(fusion + rf"{branch}\.{idx}\.running_var", f"batch_stats/audio/{path}/var")]
    # The RoBERTa text tower: BERT's rules under the text prefix (not its heads).
    for r in bert_convert.key_map(None).rules:
        if r.target.startswith(("params/mlm", "params/classifier")):
            continue
        rules.append(Rule(n["text"] + r.source, "params/text/" + r.target[len("params/"):], r.transform))
    ignore = [
        Ignore(a + r".*num_batches_tracked", "BatchNorm's step counter: only its momentum=None mode reads it"),
        Ignore(block + n["index"], "buffer: Swin's relative-position index, computed here", _check_index),
        Ignore(n["text"] + r"(?:bert\.)?embeddings\.position_ids",
               "buffer 0..max_positions-1; RoBERTa positions are computed from the ids (pad + cumsum)", _check_arange),
        Ignore(n["text"] + r"embeddings\.token_type_ids", "buffer of zeros: the default token types"),
    ]
    return rules, ignore


def key_map(module: Clap | None = None) -> KeyMap:
    """Hugging Face `ClapModel` keys -> `Clap` variables (any size; the engine checks shapes)."""
    del module
    rules, ignore = _rules(HF_NAMES, "")
    return KeyMap(rules=rules, ignore=ignore)


def laion_key_map(module: Clap | None = None) -> KeyMap:
    """Original LAION-CLAP keys (with or without `module.`; `attn.qkv` already split by
    `split_qkv`) -> `Clap` variables."""
    del module
    rules, ignore = _rules(LAION_NAMES, r"(?:module\.)?")
    a = LAION_NAMES["audio"]
    ignore += [
        Ignore(a + r"(spectrogram_extractor|logmel_extractor)\..*",
               "the STFT / mel front end: features are computed outside the model (jaxaudio.features.clap)"),
        Ignore(a + r"(head|tscam_conv)\.(weight|bias)", "HTS-AT's AudioSet classification head, unused by CLAP"),
        Ignore(a + r"layers\.\d+\.blocks\.\d+\.attn_mask", "buffer: the shifted-window mask, computed here"),
        Ignore(r"(?:module\.)?(text|audio)_transform\.sequential\.\d+\.(weight|bias)",
               "the *_transform MLPs feed only the training loss (mlp_loss), not the embeddings"),
    ]
    return KeyMap(rules=rules, ignore=ignore)


def split_qkv(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LAION's fused `...attn.qkv.{weight,bias}` (`[3d, d]`, `[3d]`, rows q, k, v) ->
    `...attn.qkv.{query,key,value}.{weight,bias}`; other keys unchanged."""
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"(.*\.attn\.qkv)\.(weight|bias)", key)
        if not m:
            out[key] = value
            continue
        value = np.asarray(value)
        if value.shape[0] % 3:
            raise ConversionError(f"{key}: fused qkv of shape {value.shape} does not split in three")
        for part, chunk in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
            out[f"{m[1]}.{part}.{m[2]}"] = chunk
    return out


def _fusion_keys(state_dict: Mapping[str, Any]) -> list[str]:
    """The fusion path's tensors, `mel_conv2d` first (the one a reader looks for)."""
    keys = [k for k in state_dict if re.search(r"patch_embed\.(mel_conv2d|fusion_model)\.", k)]
    return sorted(keys, key=lambda k: ("fusion_model" in k, k))


def laion_config(enable_fusion: bool, amodel: str = "HTSAT-tiny", audio: dict | None = None,
                 text: dict | None = None, projection_dim: int = 512) -> dict[str, Any]:
    """`Clap` kwargs of a LAION checkpoint: the `amodel` preset (HTSAT-tiny / HTSAT-base;
    spec 256, 64 mel bins, window 8) with `audio` overrides, roberta-base with `text` overrides."""
    if amodel not in LAION_AUDIO:
        raise ConversionError(f"amodel={amodel!r}: choose one of {sorted(LAION_AUDIO)}")
    audio_kwargs = {**{k: list(v) if isinstance(v, tuple) else v for k, v in LAION_AUDIO[amodel].items()},
                    "enable_fusion": bool(enable_fusion), **(audio or {})}
    # LAION trains with drop_rate 0 and drop_path 0.1 (htsat.py defaults); HF's hidden dropout 0.1 is not LAION's.
    audio_kwargs.setdefault("drop_path_rate", 0.1)
    return dict(audio=audio_kwargs, text={**ROBERTA_BASE, **(text or {})}, projection_dim=int(projection_dim),
                logit_scale_init=math.log(1 / 0.07), pad_token_id=1)


def convert_laion(source: str | Mapping[str, Any], *, enable_fusion: bool, amodel: str = "HTSAT-tiny",
                  audio: dict | None = None, text: dict | None = None, projection_dim: int = 512,
                  dtype: str = "float32", allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(variables, config)` from an original LAION-CLAP checkpoint: a path (torch file with a
    `state_dict`, loaded `weights_only` unless `allow_pickle`) or the loaded dict (with or
    without the `state_dict` level; torch tensors or arrays). `config` is what
    `launch/convert.py` saves (`{"model": "clap", "kwargs", ...}`), so `load_pretrained`
    rebuilds the model. `enable_fusion` must match the checkpoint (LAION-AI/CLAP#113); a
    mismatch is an error naming the fusion keys. `dtype` "bfloat16" stores the floating
    variables in bfloat16.
    """
    import flax.linen as nn
    import jax

    from jaxaudio.convert.engine import convert
    from jaxaudio.convert.hf import DTYPES, _cast
    from jaxaudio.convert.io import _torch_to_numpy, load_checkpoint, tensors_of

    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    if isinstance(source, Mapping):
        name = "state dict"
        obj = source["state_dict"] if isinstance(source.get("state_dict"), Mapping) else source
        state_dict = {k: _torch_to_numpy(v) if hasattr(v, "detach") else np.asarray(v) for k, v in obj.items()}
    else:
        name, obj = load_checkpoint(source, allow_pickle=allow_pickle)
        state_dict = tensors_of(obj, name, "state_dict" if isinstance(obj.get("state_dict"), Mapping) else None)
    fusion = _fusion_keys(state_dict)
    if bool(fusion) != bool(enable_fusion):
        if enable_fusion:
            raise ConversionError(f"{name}: enable_fusion=True, but the checkpoint has no fusion weights "
                                  "(audio_branch.patch_embed.mel_conv2d.* / fusion_model.*): it is an unfused "
                                  f"model; pass enable_fusion=False ({LAION_ISSUE})")
        shown = ", ".join(fusion[:3]) + (f" and {len(fusion) - 3} more" if len(fusion) > 3 else "")
        raise ConversionError(f"{name}: enable_fusion=False, but the checkpoint holds fusion weights ({shown}): "
                              f"it is a fused model; pass enable_fusion=True ({LAION_ISSUE})")
    kwargs = laion_config(enable_fusion, amodel, audio, text, projection_dim)
    module, example = build(kwargs)
    expected = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *example))
    variables = convert(split_qkv(state_dict), laion_key_map(module), expected, dtype=np.float32, source_name=name)
    return _cast(variables, dtype), {"model": "clap", "kwargs": kwargs, "dtype": dtype, "source_format": "laion",
                       "source_tensors": len(state_dict)}
