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
import dataclasses
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.convert import llama, spatial_ast
from jaxaudio.convert.engine import ConversionError, KeyMap, Rule, convert, flatten, linear, unflatten
from jaxaudio.convert.hf import DTYPES, convert_hf, read_hf_config
from jaxaudio.convert.io import load_converted, load_state_dict
from jaxaudio.convert.peft import ModuleNames
from jaxaudio.convert.qformer import bat_key_map
from jaxaudio.models.bat import DEFAULT_LORA, Bat

LLM_PREFIX = r"llm\.base_model\.model\."  # SLAM-LLM's `llm` attribute, wrapped by PEFT


def lora_rules(names: ModuleNames, src: str = LLM_PREFIX, dst: str = "params/llm/") -> list[Rule]:
    """PEFT adapter keys under `src` (`<torch module>.lora_A[.default].weight` `[r, in]`,
    `lora_B` `[out, r]`) -> `{dst}<our module>/lora_a` `[*in, r]` / `lora_b` `[r, *out]`."""
    rules = []
    for ours, theirs in names.pairs:
        module = re.escape(theirs).replace(r"\{n\}", r"(\d+)")
        target = dst + ours.replace("{n}", r"\1")
        for ab in "AB":
            rules.append(Rule(src + module + rf"\.lora_{ab}(\.default)?\.weight", f"{target}/lora_{ab.lower()}",
                              linear))
    return rules


def under(key_map: KeyMap, part: str) -> KeyMap:
    """`key_map` with its targets moved into sub-module `part` (`params/x` -> `params/part/x`)."""
    def move(target: str) -> str:
        collection, rest = target.split("/", 1)
        return f"{collection}/{part}/{rest}"
    return dataclasses.replace(key_map, rules=[dataclasses.replace(r, target=move(r.target)) for r in key_map.rules])


def bat_checkpoint_key_map() -> KeyMap:
    """SLAM-LLM's BAT `model.pt` -> `params/projector/*` and the LLM's `lora_a`/`lora_b`."""
    projector = bat_key_map(prefix="params/projector/", ignore_llm_adapters=False)
    return KeyMap(rules=[*projector.rules, *lora_rules(llama.MODULE_NAMES)], ignore=projector.ignore)


def build(kwargs: dict[str, Any]) -> tuple[Bat, tuple]:
    """`Bat(**kwargs)` and example `init` arguments: a clip of exactly `target_frames`
    STFT frames and 4 tokens (the variables depend on neither length)."""
    module = Bat(**kwargs)
    encoder = module.parts()[0]
    samples = encoder.hop_length * (encoder.target_frames - 1)
    return module, (jnp.zeros((1, 2, samples), jnp.float32), jnp.zeros((1, 4), jnp.int32))


def _subtree(tree: dict[str, Any], keep) -> dict[str, Any]:
    return unflatten({k: v for k, v in flatten(tree).items() if keep(k)})


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
    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    hf_config = read_hf_config(llama_dir)
    if hf_config.get("model_type") not in llama.HF_MODEL_TYPES:
        raise ConversionError(f"{llama_dir}: config.json has model_type={hf_config.get('model_type')!r}; "
                              f"BAT's LLM is one of {llama.HF_MODEL_TYPES}")
    kwargs = {"encoder": dict(encoder or {}), "projector": dict(projector or {}),
              "llm": llama.config_from_hf(hf_config), "lora": dict(DEFAULT_LORA if lora is None else lora)}
    module, example = build(kwargs)
    expected = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *example))

    problems, tensors = [], 0

    def attempt(fn):
        try:
            return fn()
        except ConversionError as e:
            problems.append(str(e))
            return None

    def from_file(path, key_map, want):
        nonlocal tensors
        state_dict = load_state_dict(path, allow_pickle=allow_pickle)
        tensors += len(state_dict)
        return convert(state_dict, key_map, want, source_name=path)

    encoder_map = under(spatial_ast.key_map(module.parts()[0]), "encoder")
    encoder_want = {c: {"encoder": expected[c]["encoder"]} for c in ("params", "batch_stats")}
    encoder_vars = attempt(lambda: from_file(spatial_ast_path, encoder_map, encoder_want))
    bat_want = _subtree(expected, lambda k: k.startswith("params/projector/")
                        or (k.startswith("params/llm/") and k.rsplit("/", 1)[-1].startswith("lora_")))
    bat_vars = attempt(lambda: from_file(bat_path, bat_checkpoint_key_map(), bat_want))
    llm = attempt(lambda: convert_hf(llama_dir, "llama", allow_pickle=allow_pickle))
    if problems:
        raise ConversionError("cannot convert BAT:\n" + "\n".join(problems))
    tensors += llm[1]["source_tensors"]

    flat = {**flatten(encoder_vars), **flatten(bat_vars),
            **{f"params/llm/{k}": v for k, v in flatten(llm[0]["params"]).items()}}
    want = {k: tuple(v.shape) for k, v in flatten(expected).items()}
    got = {k: tuple(np.shape(v)) for k, v in flat.items()}
    if got != want:  # each source was checked against its part; this guards the assembly
        diff = sorted(set(want.items()) ^ set(got.items()))
        raise ConversionError(f"BAT: the assembled variables differ from the model's: {diff[:20]}")
    if dtype != "float32":
        flat = {k: np.asarray(jnp.asarray(v, dtype)) if k.startswith("params/") and np.issubdtype(v.dtype, np.floating)
                else v for k, v in flat.items()}
    return unflatten(flat), {
        "model": "bat", "kwargs": kwargs, "dtype": dtype, "source_tensors": tensors,
        "sources": {"spatial_ast": os.path.abspath(spatial_ast_path), "bat": os.path.abspath(bat_path),
                    "llama": os.path.abspath(llama_dir)}}


def load_bat(out_dir: str) -> tuple[Bat, dict[str, Any]]:
    """`(module, variables)` from a directory written by `launch/convert.py --model=bat`."""
    variables, config = load_converted(out_dir)
    if config.get("model") != "bat" or "kwargs" not in config:
        raise ConversionError(f"{out_dir}: config.json is not a converted BAT model (model={config.get('model')!r})")
    return build(config["kwargs"])[0], variables
