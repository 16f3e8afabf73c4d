"""SALMONN from its four released parts -> `jaxaudio.models.salmonn.Salmonn` (reference/salmonn_beats.md §1).

  whisper_dir   a Hugging Face Whisper directory (`WhisperModel` or
                `WhisperForConditionalGeneration`, e.g. whisper-large-v2) -> params/whisper;
                its config.json sizes the encoder, the decoder is dropped
  beats_path    the BEATs checkpoint (`{"cfg", "model", "label_dict"}`, e.g.
                `BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt`) -> params/beats, sized by
                its cfg; None: a SALMONN without BEATs (speech only)
  vicuna_dir    a Hugging Face LLaMA/Vicuna directory (vicuna-13b-v1.1) -> params/llm, sized by
                its config.json
  salmonn_path  `salmonn_v1.pth`: SALMONN's trainable parameters under 'model' (a bare state
                dict and the training checkpoint `{"model", "optimizer", "config", ...}` read
                too): `speech_Qformer.bert.*`, `speech_query_tokens`, `speech_llama_proj.*`
                -> params/connector/window_qformer, `ln_speech.*`, `ln_audio.*` ->
                params/connector/fusion (`jaxaudio.convert.qformer.salmonn_key_map`), and
                `llama_model.base_model.model.model.layers.N.self_attn.{q,v}_proj.lora_{A,B}
                [.default].weight` (both PEFT spellings) -> params/llm/layers_N/attn/
                {query,value}/lora_{a,b}

Sizes the checkpoints do not carry: the connector's hidden size, query count, layer count
and FFN width come from the tensors of `salmonn_path`; its heads (12) and window (1/3 s)
are the original's unless `connector` says otherwise. The LoRA rank comes from the
adapter tensors; alpha 32, dropout 0.1 and the q_proj/v_proj targets are the original's
(`DEFAULT_LORA`) unless `lora` says otherwise. A checkpoint without adapters is refused
unless `lora=False` asks for a SALMONN without them: every released SALMONN has them, so
their absence more likely means a wrong file than a choice.

Vocabulary: SALMONN's training code adds a `[PAD]` token and resizes the LLM's embeddings
to 32001 rows, but the new row is random and never trained, and `salmonn_v1.pth` holds no
embeddings; so the LLM keeps the directory's vocabulary (32000 for Vicuna) and a pad id
only needs to index a real row (its positions are masked).

Accounting is strict (DESIGN decision 5): the Q-Former's text parts that the 2023 code
still saved (word/position embeddings, text FFN, `cls`) are ignored with a reason; any
other key, a missing variable or a mis-shaped tensor stops the conversion, and one
`ConversionError` lists the problems of all four sources.
"""
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxaudio.convert import beats, llama, whisper
from jaxaudio.convert.engine import ConversionError, Ignore, KeyMap
from jaxaudio.convert.hf import read_hf_config
from jaxaudio.convert.io import load_checkpoint, load_converted, tensors_of
from jaxaudio.convert.qformer import salmonn_key_map
from jaxaudio.convert.system import (Checkpoint, Pretrained, Problems, check_dtype, convert_system, is_adapter,
                                     lora_rules, under)
from jaxaudio.layers.lora import LoraConfig
from jaxaudio.models.salmonn import DEFAULT_LORA, Salmonn

LLM_PREFIX = r"llama_model\.base_model\.model\."  # SALMONN's `llama_model`, wrapped by PEFT
_ADAPTER = re.compile(LLM_PREFIX + r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight")
_QFORMER_LAYER = re.compile(r"speech_Qformer\.bert\.encoder\.layer\.(\d+)\.")


def salmonn_checkpoint_key_map() -> KeyMap:
    """`salmonn_v1.pth` -> `params/connector/*` and the LLM's `lora_a`/`lora_b`."""
    connector = salmonn_key_map(prefix="params/connector/window_qformer/", fusion_prefix="params/connector/fusion/",
                                ignore_llm_adapters=False)
    # SALMONN's runner saves the parameters that are not frozen, found by name through
    # `named_parameters`, which lists BEATs' shared relative-bias table once (layer 0): the
    # other layers' names of that frozen table escape the filter and land in the file.
    shared_bias = Ignore(r"beats\.encoder\.layers\.\d+\.self_attn\.relative_attention_bias\.weight",
                         "BEATs' shared relative position table (frozen; it comes from the BEATs checkpoint), "
                         "saved under its other layers' names by SALMONN's runner")
    return KeyMap(rules=[*connector.rules, *lora_rules(llama.MODULE_NAMES, LLM_PREFIX)],
                  ignore=[*connector.ignore, shared_bias])


def build(kwargs: dict[str, Any]) -> tuple[Salmonn, tuple]:
    """`Salmonn(**kwargs)` and example `init` arguments: one chunk of audio and two tokens
    on each side of it (the variables depend on no length)."""
    module = Salmonn(**kwargs)
    return module, (jnp.zeros((1, module.chunk_samples), jnp.float32), None, jnp.zeros((1, 2), jnp.int32),
                    jnp.zeros((1, 2), jnp.int32))


def connector_sizes(state_dict: Mapping[str, np.ndarray]) -> dict[str, int]:
    """`SalmonnConnector` sizes that SALMONN's tensors show: hidden size and query count
    (`speech_query_tokens [1, queries, hidden]`), layer count, FFN width."""
    sizes = {}
    tokens = state_dict.get("speech_query_tokens")
    if tokens is not None and np.ndim(tokens) == 3:
        sizes.update(num_queries=int(tokens.shape[1]), hidden_size=int(tokens.shape[2]))
    layers = {int(m[1]) for k in state_dict if (m := _QFORMER_LAYER.match(k))}
    if layers:
        sizes["num_layers"] = max(layers) + 1
    ffn = state_dict.get("speech_Qformer.bert.encoder.layer.0.intermediate_query.dense.weight")
    if ffn is not None and np.ndim(ffn) == 2:
        sizes["intermediate_size"] = int(ffn.shape[0])
    return sizes


def lora_kwargs(state_dict: Mapping[str, np.ndarray], lora: dict[str, Any] | bool | None,
                source: str) -> dict[str, Any] | None:
    """The `Salmonn.lora` field for a checkpoint's adapters.

    `lora=None`: the checkpoint must hold adapters; their rank is read from the tensors and
    the rest is `DEFAULT_LORA`. A dict overrides `DEFAULT_LORA` (a `rank` in it must be the
    tensors'). `lora=False`: a SALMONN without adapters (a checkpoint holding some is then
    refused, naming them).
    """
    if lora is False:
        return None
    if lora is not None and not isinstance(lora, Mapping):
        raise ConversionError(f"lora={lora!r}: pass None (from the checkpoint), False (no adapters) or a dict of "
                              "LoraConfig fields")
    ranks: dict[int, str] = {}
    for key, value in sorted(state_dict.items()):
        if (m := _ADAPTER.fullmatch(key)) and np.ndim(value) == 2:
            ranks.setdefault(int(value.shape[0] if m["ab"] == "A" else value.shape[1]), f"{key} {value.shape}")
    if not ranks:
        raise ConversionError(f"{source}: holds no LoRA adapters (llama_model.base_model.model.model.layers.N."
                              "self_attn.{q,v}_proj.lora_{A,B}[.default].weight), which SALMONN's checkpoint has; "
                              "to convert a SALMONN without adapters pass lora=False")
    if len(ranks) > 1:
        raise ConversionError(f"{source}: the LoRA adapters have different ranks: {sorted(ranks.values())}")
    rank = next(iter(ranks))
    given = dict(lora or {})
    if "rank" in given and int(given["rank"]) != rank:
        raise ConversionError(f"lora rank={given['rank']} was given, but the adapters in {source} have rank {rank} "
                              f"(e.g. {ranks[rank]})")
    kwargs = {**DEFAULT_LORA, **given, "rank": rank}
    try:
        LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"lora={given}: not a valid LoraConfig ({e})") from None
    return kwargs


def _hf_kwargs(path: str, mod, what: str) -> dict[str, Any]:
    """A Hugging Face directory's module kwargs, checking it holds the right model."""
    hf = read_hf_config(path)
    if hf.get("model_type") not in mod.HF_MODEL_TYPES:
        raise ConversionError(f"{path}: config.json has model_type={hf.get('model_type')!r}; SALMONN's {what} is "
                              f"one of {mod.HF_MODEL_TYPES}")
    try:
        return mod.config_from_hf(hf)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None


def _read_beats(path: str, allow_pickle: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`(BEATs kwargs from its cfg, state dict)` of a BEATs checkpoint, read once."""
    file, ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("cfg"), Mapping):
        keys = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ConversionError(f"{file}: no 'cfg' dict (the BEATsConfig fields); top-level keys: {keys}")
    return beats.config_from_checkpoint(ckpt["cfg"], source=f"{file} cfg"), tensors_of(ckpt, file, "model")


def _read_salmonn(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    file, ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
    if not isinstance(ckpt, Mapping):
        raise ConversionError(f"{file}: holds a {type(ckpt).__name__}, not a state dict")
    return tensors_of(ckpt, file)  # takes 'model' when there is one


def _sized_connector(state_dict, connector: dict[str, Any] | None, source: str) -> dict[str, Any]:
    kwargs = {**connector_sizes(state_dict), **(connector or {})}
    hidden, heads = kwargs.get("hidden_size", 768), kwargs.get("num_heads", 12)
    if hidden % heads:
        raise ConversionError(f"{source}: the Q-Former's hidden size {hidden} (from speech_query_tokens) is not a "
                              f"multiple of num_heads={heads}, which the checkpoint does not record; pass "
                              "connector={'num_heads': ...}")
    return kwargs


def convert_salmonn(whisper_dir: str, beats_path: str | None, vicuna_dir: str, salmonn_path: str, *,
                    allow_pickle: bool = False, dtype: str = "float32", connector: dict[str, Any] | None = None,
                    lora: dict[str, Any] | bool | None = None, chunk_seconds: float = 30.0
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Convert SALMONN's four checkpoints (see the module docstring); returns `(variables, config)`.

    `connector`: `SalmonnConnector` kwargs over the sizes read from `salmonn_path` (e.g.
    `num_heads`, `second_per_window`). `lora`: None reads the rank from the adapters
    (alpha 32, dropout 0.1, q_proj/v_proj); a dict overrides `DEFAULT_LORA`; False: no
    adapters. `chunk_seconds`: `Salmonn.chunk_seconds`. `dtype` is the parameters' storage
    dtype. `allow_pickle` lets torch fully unpickle the .pt/.pth files (the training
    checkpoint's `config` needs it; trusted files only). `config` is `{"model":
    "salmonn", "kwargs", "dtype", "source_tensors", "sources"}` for `save_converted` /
    `load_salmonn`.
    """
    check_dtype(dtype)
    sizing = Problems()
    whisper_kwargs = sizing.attempt(_hf_kwargs, whisper_dir, whisper, "speech encoder")
    llm_kwargs = sizing.attempt(_hf_kwargs, vicuna_dir, llama, "LLM")
    beats_read = None if beats_path is None else sizing.attempt(_read_beats, beats_path, allow_pickle)
    salmonn_sd = sizing.attempt(_read_salmonn, salmonn_path, allow_pickle)
    if salmonn_sd is not None:
        connector = sizing.attempt(_sized_connector, salmonn_sd, connector, salmonn_path)
        lora = sizing.attempt(lora_kwargs, salmonn_sd, lora, salmonn_path)
    sizing.raise_any("cannot convert SALMONN")

    kwargs = {"whisper": whisper_kwargs, "beats": None if beats_read is None else beats_read[0],
              "connector": connector, "llm": llm_kwargs, "lora": lora, "chunk_seconds": float(chunk_seconds)}
    module, example = build(kwargs)
    parts = [Pretrained(whisper_dir, "whisper", "whisper")]
    if beats_read is not None:
        beats_map = under(beats.key_map(beats.build(beats_read[0])[0]), "beats")
        parts.append(Checkpoint(beats_path, beats_map, lambda k: k.startswith("params/beats/"), beats_read[1]))
    parts += [Checkpoint(salmonn_path, salmonn_checkpoint_key_map(),
                         lambda k: k.startswith("params/connector/") or is_adapter(k), salmonn_sd),
              Pretrained(vicuna_dir, "llama", "llm")]
    variables, tensors = convert_system("SALMONN", module, example, parts, dtype=dtype, allow_pickle=allow_pickle)
    sources = {"whisper": whisper_dir, "beats": beats_path, "vicuna": vicuna_dir, "salmonn": salmonn_path}
    return variables, {"model": "salmonn", "kwargs": kwargs, "dtype": dtype, "source_tensors": tensors,
                       "sources": {k: None if v is None else os.path.abspath(v) for k, v in sources.items()}}


def load_salmonn(out_dir: str) -> tuple[Salmonn, dict[str, Any]]:
    """`(module, variables)` from a directory written by `launch/convert.py --model=salmonn`."""
    variables, config = load_converted(out_dir)
    if config.get("model") != "salmonn" or "kwargs" not in config:
        raise ConversionError(f"{out_dir}: config.json is not a converted SALMONN model "
                              f"(model={config.get('model')!r})")
    return build(config["kwargs"])[0], variables
