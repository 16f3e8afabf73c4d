"""Hugging Face checkpoints: a directory with `config.json` and the weights.

The model's sizes come from the source's `config.json`; one module per model family
(`jaxaudio/convert/<name>.py`) says how, through three functions:

    HF_MODEL_TYPES: tuple[str, ...]            # config.json `model_type` values it accepts
    config_from_hf(hf: dict) -> dict           # kwargs of our Linen module (json-serialisable)
    build(kwargs: dict) -> (module, example)   # the module and example `init` arguments
    key_map(module) -> KeyMap                  # source keys -> our variables

`convert_hf` writes nothing; `launch/convert.py` saves the result with the kwargs, and
`load_pretrained` rebuilds the module from them.
"""
import importlib
import os
from typing import Any

import numpy as np

from jaxaudio.convert.engine import ConversionError, convert
from jaxaudio.convert.io import load_converted, load_state_dict, read_config_json

# Our name -> the module holding its conversion; one line per Hugging Face family.
HF_MODELS = {
    "whisper": "jaxaudio.convert.whisper",
    "bert": "jaxaudio.convert.bert",
    "llama": "jaxaudio.convert.llama",
    "ast": "jaxaudio.convert.ast",
    "qformer": "jaxaudio.convert.qformer",
    "clap": "jaxaudio.convert.clap",
}
# Original checkpoints that carry their own config (module with `convert_checkpoint` and `build`).
SELF_DESCRIBING = {
    "beats": "jaxaudio.convert.beats",
}
# Everything `load_pretrained` can rebuild from a saved config (module with `build(kwargs)`).
BUILDERS = {**SELF_DESCRIBING, "bat": "jaxaudio.convert.bat", "salmonn": "jaxaudio.convert.salmonn",
            "audiobert": "jaxaudio.convert.audiobert"}
DTYPES = {"float32": np.float32, "bfloat16": "bfloat16"}


def hf_module(name: str):
    if name not in HF_MODELS:
        raise ConversionError(f"model {name!r}: no Hugging Face converter; known: {sorted(HF_MODELS)}")
    return importlib.import_module(HF_MODELS[name])


def read_hf_config(source: str) -> dict[str, Any]:
    """`config.json` of a checkpoint directory (or of the directory holding a weights file)."""
    directory = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    return read_config_json(directory, f"{source}: no config.json beside the weights; a Hugging Face checkpoint "
                                       "directory (save_pretrained) has one, and the model's sizes come from it")


def detect_model(hf_config: dict[str, Any], source: str) -> str:
    """Our model name for a config.json's `model_type`."""
    model_type = hf_config.get("model_type")
    for name in HF_MODELS:
        if model_type in hf_module(name).HF_MODEL_TYPES:
            return name
    raise ConversionError(f"{source}: config.json has model_type={model_type!r}, which no converter takes; "
                          f"pass --model (one of {sorted(HF_MODELS)})")


def hf_field(hf: dict[str, Any], key: str, source: str = "config.json") -> Any:
    """`hf[key]`, or an error that names the missing field."""
    if key not in hf:
        raise ConversionError(f"{source}: field {key!r} is missing (model_type={hf.get('model_type')!r})")
    return hf[key]


def _cast(variables: dict[str, Any], dtype: str) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    if dtype == "float32":
        return variables
    return jax.tree.map(
        lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16)) if np.issubdtype(a.dtype, np.floating) else a, variables)


def convert_pretrained(source: str, model: str | None = None, *, dtype: str = "float32",
                       allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """`convert_hf`, or an original checkpoint that carries its own config (BEATs)."""
    if model in SELF_DESCRIBING:
        if dtype not in DTYPES:
            raise ConversionError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
        variables, config = importlib.import_module(SELF_DESCRIBING[model]).convert_checkpoint(source, allow_pickle)
        return _cast(variables, dtype), {**config, "dtype": dtype}
    return convert_hf(source, model, dtype=dtype, allow_pickle=allow_pickle)


def convert_hf(source: str, model: str | None = None, *, dtype: str = "float32",
               allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Convert a local Hugging Face checkpoint; returns `(variables, config)`.

    `config` holds `model` (our name) and `kwargs` (the module's fields), which is what
    `save_converted` writes and `load_pretrained` reads back.
    """
    import flax.linen as nn
    import jax

    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    hf_config = read_hf_config(source)
    name = model or detect_model(hf_config, source)
    mod = hf_module(name)
    kwargs = mod.config_from_hf(hf_config)
    state_dict = load_state_dict(source, allow_pickle=allow_pickle)
    module, example = mod.build(kwargs)
    expected = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *example))
    variables = _cast(convert(state_dict, mod.key_map(module), expected, dtype=np.float32, source_name=source), dtype)
    return variables, {"model": name, "kwargs": kwargs, "dtype": dtype, "source_model_type": hf_config.get("model_type"),
                       "source_tensors": len(state_dict)}


def load_pretrained(out_dir: str) -> tuple[Any, dict[str, Any]]:
    """`(module, variables)` from a checkpoint written by `launch/convert.py` for a
    Hugging Face model, a self-describing original checkpoint (BEATs) or a system (BAT)."""
    variables, config = load_converted(out_dir)
    return converted_module(config, out_dir), variables


def converted_module(config: dict[str, Any], out_dir: str) -> Any:
    """The module a converted checkpoint's `config.json` (`read_converted_config`) describes."""
    if "model" not in config or "kwargs" not in config:
        raise ConversionError(f"{out_dir}: config.json is not a converted Hugging Face model "
                              "(it needs 'model' and 'kwargs')")
    name = config["model"]
    mod = importlib.import_module(BUILDERS[name]) if name in BUILDERS else hf_module(name)
    module, _ = mod.build(config["kwargs"])
    return module
