"""BAT (Zheng et al., 2024): Spatial-AST -> Q-Former projector -> LLaMA-2 with LoRA.

As SLAM-LLM's `seld_spatialsoundqa` (reference/bat_spatial_ast.md §4):

  wave [batch, 2, samples] -> encoder (Spatial-AST, eval mode, frozen: stop_gradient)
    -> tokens [batch, 515, 768] (3 CLS + 512 patches, the last block's output)
  -> projector (BatProjector: 64 queries, 8-layer Q-Former, Linear 768 -> 4096, LayerNorm)
    -> audio embeddings [batch, 64, 4096]
  -> llm (LLaMA-2 7B, frozen, LoRA r 8 / alpha 32 / dropout 0.05 on q_proj and v_proj)
     over [64 audio][BOS + prompt][answer][EOS] (text right-padded) -> logits.

The loss covers the answer and EOS only (`audio_llm.build_sequence` makes the labels,
`audio_llm.text_loss` drops the audio positions). `answer` decodes (beam 4, 200 new tokens in the original)
from the prefix [audio][BOS + prompt], batches left-padded.

Sizes come from three dicts of module kwargs (`encoder`, `projector`, `llm`), so the same
code runs the original and a tiny test model; `{}` is the original's size. The
projector's `llm_width` and `encoder_hidden_size` follow the LLM and the encoder.
"""
import dataclasses
import functools
import json
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.generate import GenerateOutput, generate
from jaxaudio.layers.lora import LoraConfig, lora
from jaxaudio.models.audio_llm import llm_adapters, part_kwargs
from jaxaudio.models.llama import Llama
from jaxaudio.models.qformer import BatProjector
from jaxaudio.models.spatial_ast import SpatialAST

PROMPT = ("Based on the audio you've heard, refer to the instruction and provide a response.\n\n"
          "### Instruction:\n{question}\n\n### Response:")
# LoRA on the LLM's q_proj/v_proj (`llm/layers_N/attn/{query,value}` here).
DEFAULT_LORA = {"targets": r"llm/layers_\d+/attn/(query|value)", "rank": 8, "alpha": 32.0, "dropout": 0.05}


class Bat(nn.Module):
    """The BAT model; see the module docstring.

    Fields: `encoder`, `projector`, `llm` (kwargs of `SpatialAST`, `BatProjector`, `Llama`;
    json-serialisable, without dtypes) and `lora` (`LoraConfig` kwargs: targets regex over
    module paths, rank, alpha, dropout; None: no adapters). `dtype`/`param_dtype` (a dtype
    or its name) apply to all three parts.

    Variables: `params/{encoder,projector,llm}` (LoRA's `lora_a`/`lora_b` inside `llm`) and
    `batch_stats/encoder` (Spatial-AST's BatchNorm statistics, only read).
    """
    encoder: dict = dataclasses.field(default_factory=dict)
    projector: dict = dataclasses.field(default_factory=dict)
    llm: dict = dataclasses.field(default_factory=dict)
    lora: dict | None = dataclasses.field(default_factory=lambda: dict(DEFAULT_LORA))
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __hash__(self):
        # The dict fields are unhashable; this lets a Bat be a static argument of `jax.jit`.
        return hash((json.dumps([self.encoder, self.projector, self.llm, self.lora], sort_keys=True),
                     str(jnp.dtype(self.dtype)), str(jnp.dtype(self.param_dtype)), self.name))

    @nn.nowrap
    def parts(self, names: tuple[str | None, ...] = (None, None, None)) -> tuple[SpatialAST, BatProjector, Llama]:
        """The three sub-modules (unbound unless built inside `setup`), named `names`."""
        kw = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
        encoder = SpatialAST(**part_kwargs(self.encoder, "Bat", "encoder"), **kw, name=names[0])
        llm = Llama(**part_kwargs(self.llm, "Bat", "llm"), **kw, name=names[2])
        proj = part_kwargs(self.projector, "Bat", "projector")
        for key, value in (("llm_width", llm.hidden_size), ("encoder_hidden_size", encoder.embed_dim)):
            if proj.setdefault(key, value) != value:
                raise ValueError(f"Bat: projector {key}={proj[key]} but the parts need {value}")
        return encoder, BatProjector(**proj, **kw, name=names[1]), llm

    @nn.nowrap
    def lora_config(self) -> LoraConfig | None:
        return None if self.lora is None else LoraConfig(**self.lora)

    def setup(self):
        # Fields and sub-modules share the names `encoder`/`projector`/`llm`, so the
        # sub-modules are named explicitly and kept under other attributes.
        self.encoder_module, self.projector_module, self.llm_module = self.parts(("encoder", "projector", "llm"))

    def encode_audio(self, wave: jax.Array, deterministic: bool = True) -> jax.Array:
        """`wave [batch, 2, samples]` -> audio embeddings `[batch, num_queries, llm_width]`.

        The encoder runs in eval mode (BatchNorm statistics, no augmentation) and is frozen:
        no gradient reaches it. `deterministic=False` applies the Q-Former's dropout.
        """
        tokens = jax.lax.stop_gradient(self.encoder_module(wave, train=False)["tokens"])
        return self.projector_module(tokens, deterministic=deterministic)

    def embed_text(self, input_ids: jax.Array) -> jax.Array:
        """`[batch, len]` -> the LLM's token embeddings `[batch, len, llm_width]`."""
        return self.llm_module.embed(input_ids)

    def __call__(self, wave: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 deterministic: bool = True, lora_scale: Any = None) -> jax.Array:
        """`wave [batch, 2, samples]`, `input_ids [batch, len]` (BOS + prompt + answer + EOS,
        right-padded), `attention_mask [batch, len]` (1 = token) -> logits
        `[batch, num_queries + len, vocab]` float32, the audio positions first.

        `deterministic=False` (training) applies the projector's and LoRA's dropout (rng
        `dropout`). `lora_scale`: None = alpha / rank.
        """
        audio = self.encode_audio(wave, deterministic)
        text = self.embed_text(input_ids)
        x = jnp.concatenate([audio.astype(text.dtype), text], axis=1)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        mask = jnp.concatenate([jnp.ones(audio.shape[:2], jnp.int32), attention_mask.astype(jnp.int32)], axis=1)
        with lora(self.lora_config(), scale=lora_scale, deterministic=deterministic):
            return self.llm_module(inputs_embeds=x, attention_mask=mask)


def _left_padded_prefix(audio: np.ndarray, text: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`[audio][pad..][text]` -> `[pad..][audio][text]` per row, and its mask (0 = padding).

    `audio [batch, q, ...]`, `text [batch, p, ...]` left-padded to `p` with `lengths` tokens.
    """
    batch, q, p = audio.shape[0], audio.shape[1], text.shape[1]
    order, mask = np.zeros((batch, q + p), np.int32), np.ones((batch, q + p), np.int32)
    for i, n in enumerate(lengths):
        pads = p - int(n)
        order[i] = np.concatenate([q + np.arange(pads), np.arange(q), q + pads + np.arange(n)])
        mask[i, :pads] = 0
    return order, mask


def answer(module: Bat, variables: dict[str, Any], wave: jax.Array, prompt_ids: Sequence[Sequence[int]], *,
           bos_token_id: int, eos_token_id: int | Sequence[int], pad_token_id: int = 0, num_beams: int = 4,
           max_new_tokens: int = 200, length_penalty: float = 1.0, lora_scale: Any = None) -> GenerateOutput:
    """Answer one prompt per clip: `wave [batch, 2, samples]`, `prompt_ids` (token ids of
    `PROMPT.format(question=...)`, without BOS; lengths may differ) -> `GenerateOutput`
    (`tokens [batch, max_new_tokens]`, `pad_token_id` after EOS).

    The prefix is [audio embeddings][BOS + prompt], left-padded to the longest prompt;
    decoding is `jaxaudio.generate.generate` with the adapters found in `variables`.
    """
    if len(prompt_ids) != wave.shape[0]:
        raise ValueError(f"answer: {len(prompt_ids)} prompts for {wave.shape[0]} clips")
    lengths = np.asarray([1 + len(p) for p in prompt_ids])
    ids = np.full((len(prompt_ids), int(lengths.max())), pad_token_id, np.int32)
    for i, p in enumerate(prompt_ids):
        ids[i, ids.shape[1] - lengths[i]:] = [bos_token_id, *p]
    audio, text = _encode(module, variables, jnp.asarray(wave), jnp.asarray(ids))
    order, mask = _left_padded_prefix(audio, text, lengths)
    prefix = jnp.take_along_axis(jnp.concatenate([audio.astype(text.dtype), text], axis=1),
                                 jnp.asarray(order)[:, :, None], axis=1)
    llm_params = variables["params"]["llm"]
    return generate(module.parts()[2], llm_params, inputs_embeds=prefix, attention_mask=jnp.asarray(mask),
                    max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                    num_beams=num_beams, length_penalty=length_penalty, lora=llm_adapters(module.lora_config(), llm_params), lora_scale=lora_scale)


@functools.partial(jax.jit, static_argnums=0)
def _encode(module: Bat, variables, wave, ids):
    audio = module.apply(variables, wave, method=Bat.encode_audio)
    return audio, module.apply(variables, ids, method=Bat.embed_text)
