"""BAT from its three released parts -> `jaxaudio.models.bat.Bat` (reference/bat_spatial_ast.md §3-4).

  spatial_ast_path  Spatial-AST `finetuned.pth` (`ckpt['model']`)  -> params/encoder, batch_stats/encoder
                    through `jaxaudio.convert.spatial_ast.key_map`
  bat_path          SLAM-LLM's `model.pt`, the trainable parameters only:
                    `encoder_projector.{query, qformer.*, linear, norm}` -> params/projector
                    (`jaxaudio.convert.qformer.bat_key_map`) and the LLM's adapters
                    `llm.base_model.model.model.layers.N.self_attn.{q,v}_proj.lora_{A,B}.default.weight`
                    -> params/llm/layers_N/attn/{query,value}/lora_{a,b} (names through
                    `jaxaudio.convert.llama.MODULE_NAMES`)
  llama_dir         the Hugging Face Llama-2-7b-hf directory -> params/llm (`convert_hf`); its
                    config.json sizes the LLM

Every tensor of each source is mapped or ignored with a reason and every variable of the
model is filled; otherwise one `ConversionError` lists the problems of all three sources.
"""
import os
from typing import Any

import jax.numpy as jnp

from jaxaudio.convert import llama, spatial_ast
from jaxaudio.convert.engine import ConversionError, KeyMap
from jaxaudio.convert.hf import read_hf_config
from jaxaudio.convert.io import load_converted
from jaxaudio.convert.qformer import bat_key_map
from jaxaudio.convert.system import (Checkpoint, Pretrained, check_dtype, convert_system, is_adapter, lora_rules,
                                     under)
from jaxaudio.models.bat import DEFAULT_LORA, Bat

LLM_PREFIX = r"llm\.base_model\.model\."  # SLAM-LLM's `llm` attribute, wrapped by PEFT


def bat_checkpoint_key_map() -> KeyMap:
    """SLAM-LLM's BAT `model.pt` -> `params/projector/*` and the LLM's `lora_a`/`lora_b`."""
    projector = bat_key_map(prefix="params/projector/", ignore_llm_adapters=False)
    return KeyMap(rules=[*projector.rules, *lora_rules(llama.MODULE_NAMES, LLM_PREFIX)], ignore=projector.ignore)


def build(kwargs: dict[str, Any]) -> tuple[Bat, tuple]:
    """`Bat(**kwargs)` and example `init` arguments: a clip of exactly `target_frames`
    STFT frames and 4 tokens (the variables depend on neither length)."""
    module = Bat(**kwargs)
    encoder = module.parts()[0]
    samples = encoder.hop_length * (encoder.target_frames - 1)
    return module, (jnp.zeros((1, 2, samples), jnp.float32), jnp.zeros((1, 4), jnp.int32))


def convert_bat(spatial_ast_path: str, bat_path: str, llama_dir: str, *, allow_pickle: bool = False,
                dtype: str = "float32", encoder: dict[str, Any] | None = None,
                projector: dict[str, Any] | None = None, lora: dict[str, Any] | None = None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Convert BAT's three checkpoints; returns `(variables, config)`.

    `encoder`/`projector`/`lora`: `Bat` kwargs for the parts whose sizes the checkpoints do
    not carry (None: the original's — ViT-B Spatial-AST, 8-layer Q-Former with 64 queries,
    LoRA r 8 alpha 32 on q_proj/v_proj); the LLM is sized by `llama_dir/config.json`.
    `dtype` is the parameters' storage dtype; BatchNorm statistics stay float32.
    `config` is `{"model": "bat", "kwargs": ..., ...}` for `save_converted` / `load_bat`.
    """
    check_dtype(dtype)
    hf_config = read_hf_config(llama_dir)
    if hf_config.get("model_type") not in llama.HF_MODEL_TYPES:
        raise ConversionError(f"{llama_dir}: config.json has model_type={hf_config.get('model_type')!r}; "
                              f"BAT's LLM is one of {llama.HF_MODEL_TYPES}")
    kwargs = {"encoder": dict(encoder or {}), "projector": dict(projector or {}),
              "llm": llama.config_from_hf(hf_config), "lora": dict(DEFAULT_LORA if lora is None else lora)}
    module, example = build(kwargs)
    parts = [
        Checkpoint(spatial_ast_path, under(spatial_ast.key_map(module.parts()[0]), "encoder"),
                   lambda k: k.split("/", 2)[1] == "encoder"),  # params and batch_stats
        Checkpoint(bat_path, bat_checkpoint_key_map(), lambda k: k.startswith("params/projector/") or is_adapter(k)),
        Pretrained(llama_dir, "llama", "llm"),
    ]
    variables, tensors = convert_system("BAT", module, example, parts, dtype=dtype, allow_pickle=allow_pickle)
    return variables, {
        "model": "bat", "kwargs": kwargs, "dtype": dtype, "source_tensors": tensors,
        "sources": {"spatial_ast": os.path.abspath(spatial_ast_path), "bat": os.path.abspath(bat_path),
                    "llama": os.path.abspath(llama_dir)}}


def load_bat(out_dir: str) -> tuple[Bat, dict[str, Any]]:
    """`(module, variables)` from a directory written by `launch/convert.py --model=bat`."""
    variables, config = load_converted(out_dir)
    if config.get("model") != "bat" or "kwargs" not in config:
        raise ConversionError(f"{out_dir}: config.json is not a converted BAT model (model={config.get('model')!r})")
    return build(config["kwargs"])[0], variables
