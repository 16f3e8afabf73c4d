"""AudioBERT (Ok et al., ICASSP 2025): BERT for masked-language modelling with LoRA, where
the first token of each auditory span is replaced by an AST embedding of a retrieved clip.

As HJ-Ok/AudioBERT's `model/AudioBERT/*/model.py` (reference/audiobert.md §3):

  audio [b, S, frames, mel] (ASTFeatureExtractor output of each span's clip)
    -> AST (trainable) last_hidden_state (after its final LayerNorm) [b*S, 2 + patches, h_ast]
    -> mean over ALL tokens (CLS, distillation, patches)             [b*S, h_ast]
    -> `audio_proj` Linear h_ast -> h_bert, only when the widths differ
       (the original's `Linear(768, 1024)` for BERT-large)           audio vectors [b, S, h_bert]
  input_ids [b, L]
    -> "double" (the released code): x = bert.embeddings(input_ids) (word + position + type,
       LayerNorm, dropout); x[i, span_positions[i, s]] = audio vector s (replace, slots in
       order: a later slot wins a shared position); BertForMaskedLM(inputs_embeds=x) with NO
       attention mask, which adds position / type embeddings, LayerNorm and dropout again.
    -> "single": the audio vector replaces the word embedding, one embedding pass, and the
       attention mask is applied.
  -> BERT (LoRA on query / key / value: r 64, alpha 128, dropout 0.01) -> MLM logits [b, L, vocab]

Gates: "always" (the released code) runs every example with LoRA at alpha / r. "span" (what
the abstract describes: "LoRA only when the detector fires") runs an example whose
`span_positions` are all -1 as plain BERT: LoRA scale 0, no injection, one embedding pass and
its attention mask, whatever `injection` is. With either gate a slot at -1 injects nothing
(the released code never produces -1: its span finder falls back to 0 and the last token).

`freeze_ast` (not the original's default: its freeze lines are commented out) runs AST in
eval mode behind a stop-gradient, so its vector of a clip is a constant that a task may
compute once per clip and pass as `audio_vectors` (`tasks.audiobert` does: the step then
runs no AST at all).

Sizes come from two dicts of module kwargs (`bert`, `ast`); `{}` is bert-base-uncased and
MIT/ast-finetuned-audioset-10-10-0.4593 (768 wide each: no projection).
"""
import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.layers import constrain, dense
from jaxaudio.layers.lora import LoraConfig, lora
from jaxaudio.layers.transformer import ACT
from jaxaudio.models.ast import AST
from jaxaudio.models.audio_llm import part_kwargs
from jaxaudio.models.bert import Bert

# PEFT LoraConfig(r=64, lora_alpha=128, lora_dropout=0.01, target_modules=["query", "key", "value"]).
DEFAULT_LORA = {"targets": r"bert/layers_\d+/attention/(query|key|value)", "rank": 64, "alpha": 128.0,
                "dropout": 0.01}
INJECTIONS = ("double", "single")
GATES = ("span", "always")


class AudioBert(nn.Module):
    """The AudioBERT model; see the module docstring.

    Fields: `bert` (kwargs of `jaxaudio.models.bert.Bert`; head "mlm" and no pooler unless
    given: `BertForMaskedLM`), `ast` (kwargs of `jaxaudio.models.ast.AST`), `lora`
    (`LoraConfig` kwargs; None: no adapters), `injection` ("double" | "single"), `gate`
    ("span" | "always"); `dtype` / `param_dtype` (a dtype or its name) apply to every part.

    Variables: `params/bert/...` (`Bert`'s names; `lora_a` / `lora_b` beside the adapted
    kernels), `params/ast/...`, `params/audio_proj` (only when the widths differ).
    """
    bert: dict = dataclasses.field(default_factory=dict)
    ast: dict = dataclasses.field(default_factory=dict)
    lora: dict | None = dataclasses.field(default_factory=lambda: dict(DEFAULT_LORA))
    injection: str = "double"
    gate: str = "span"
    freeze_ast: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __hash__(self):
        # The dict fields are unhashable; this lets an AudioBert be a static argument of `jax.jit`.
        return hash((json.dumps([self.bert, self.ast, self.lora], sort_keys=True), self.injection, self.gate,
                     self.freeze_ast, str(jnp.dtype(self.dtype)), str(jnp.dtype(self.param_dtype)), self.name))

    @nn.nowrap
    def parts(self, names: tuple[str | None, str | None] = (None, None)) -> tuple[Bert, AST]:
        """The two sub-modules (unbound unless built inside `setup`), named `names`."""
        if self.injection not in INJECTIONS:
            raise ValueError(f"AudioBert: injection={self.injection!r}; choose one of {INJECTIONS}")
        if self.gate not in GATES:
            raise ValueError(f"AudioBert: gate={self.gate!r}; choose one of {GATES}")
        kw = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
        bert = {"head": "mlm", "pooler": False, **part_kwargs(self.bert, "AudioBert", "bert")}
        if bert["head"] != "mlm":
            raise ValueError(f"AudioBert: bert head={bert['head']!r}; AudioBERT is a masked LM (head 'mlm')")
        return (Bert(**bert, **kw, name=names[0]),
                AST(**part_kwargs(self.ast, "AudioBert", "ast"), **kw, name=names[1]))

    @nn.nowrap
    def lora_config(self) -> LoraConfig | None:
        return None if self.lora is None else LoraConfig(**self.lora)

    def setup(self):
        # Fields and sub-modules share the names `bert` / `ast`: the sub-modules are named
        # explicitly and kept under other attributes.
        self.bert_module, self.ast_module = self.parts(("bert", "ast"))
        width = self.bert_module.hidden_size
        if self.ast_module.hidden_size != width:
            self.audio_proj = dense(width, ("embed", "mlp"), name="audio_proj", dtype=jnp.dtype(self.dtype),
                                    param_dtype=jnp.dtype(self.param_dtype))
        else:
            self.audio_proj = None

    def ast_vector(self, ast_input: jax.Array, train: bool = False) -> jax.Array:
        """`ast_input [n, frames, mel]` (ASTFeatureExtractor's output) -> `[n, ast hidden]`:
        AST's last_hidden_state (after its final LayerNorm) averaged over all its tokens.
        `train` applies AST's dropout, unless `freeze_ast` (then: eval mode, no gradient)."""
        h = self.ast_module(ast_input, train=train and not self.freeze_ast)["last_hidden_state"]
        v = jnp.mean(h, axis=1)
        return jax.lax.stop_gradient(v) if self.freeze_ast else v

    def project(self, ast_vectors: jax.Array) -> jax.Array:
        """`[..., ast hidden]` -> `[..., bert hidden]`: `audio_proj` when the widths differ."""
        return ast_vectors if self.audio_proj is None else self.audio_proj(ast_vectors)

    def audio_vector(self, ast_input: jax.Array, train: bool = False) -> jax.Array:
        """`ast_input [n, frames, mel]` -> the injected vectors `[n, bert hidden]`
        (`project(ast_vector(ast_input))`)."""
        return self.project(self.ast_vector(ast_input, train=train))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, span_positions: jax.Array,
                 audio: jax.Array | None = None, audio_vectors: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        """`input_ids [b, L]`, `attention_mask [b, L]` (1 = token; "double" ignores it where a
        span is injected, as the released code), `span_positions [b, S]` int (token index of
        each span's first token, -1 = no span in that slot; S = 1 animal, 2 pitch), exactly one
        of `audio [b, S, frames, mel]` (AST input per slot) and `audio_vectors [b, S, ast
        hidden]` (precomputed `ast_vector`s; `audio_proj` still applies) -> MLM logits
        `[b, L, vocab]` float32.

        `train` applies dropout (BERT's, both embedding passes', LoRA's, AST's): rng `dropout`.
        Positions must lie in [-1, L): checked when `span_positions` is concrete (ValueError);
        under `jax.jit` the rows of an example with a position outside are NaN.
        """
        b, length = self._check(input_ids, attention_mask, span_positions, audio, audio_vectors)
        slots = span_positions.shape[1]
        bert = self.bert_module
        if audio is not None:
            vectors = self.ast_vector(audio.reshape((b * slots,) + audio.shape[2:]), train=train)
            vectors = vectors.reshape(b, slots, -1)
        else:
            vectors = audio_vectors
        vectors = self.project(vectors)
        span_positions = span_positions.astype(jnp.int32)
        valid = span_positions >= 0                                                # [b, S]
        has_span = jnp.any(valid, axis=1)                                          # [b]
        words = bert.embed(input_ids, words_only=True)                             # [b, L, h] word embeddings

        def inject(x):
            # Slot by slot, so that a later slot wins a position two slots share (as torch's
            # two successive index assignments do).
            for s in range(slots):
                hit = (jnp.arange(length)[None, :] == span_positions[:, s:s + 1]) & valid[:, s:s + 1]
                x = jnp.where(hit[..., None], vectors[:, s, None, :].astype(x.dtype), x)
            return x

        mask = attention_mask
        if self.injection == "double":
            # The released code: bert.embeddings(input_ids), overwritten, is BERT's inputs_embeds.
            x = inject(bert.embed(input_ids, deterministic=not train))
            if self.gate == "span":  # no span: plain BERT (word embeddings, one pass, masked)
                x = jnp.where(has_span[:, None, None], x, words.astype(x.dtype))
                mask = jnp.where(has_span[:, None], 1, attention_mask)
            else:
                mask = None
        else:
            x = inject(words)
        x = constrain(x, ACT)

        config = self.lora_config()
        scale = None
        if config is not None and self.gate == "span":
            scale = jnp.where(has_span, config.scale, 0.0)                        # [b]
        with lora(config, scale=scale, deterministic=not train):
            logits = bert(inputs_embeds=x, attention_mask=mask, deterministic=not train).logits
        if isinstance(span_positions, jax.core.Tracer):  # positions not checkable: poison the row
            bad = jnp.any((span_positions < -1) | (span_positions >= length), axis=1)
            logits = jnp.where(bad[:, None, None], jnp.nan, logits)
        return logits

    @nn.nowrap
    def _check(self, input_ids, attention_mask, span_positions, audio, audio_vectors) -> tuple[int, int]:
        if (audio is None) == (audio_vectors is None):
            raise ValueError("AudioBert: pass exactly one of audio [batch, spans, frames, mel] and "
                             "audio_vectors [batch, spans, ast hidden]")
        if input_ids.ndim != 2:
            raise ValueError(f"AudioBert: input_ids must be [batch, len]; got shape {tuple(input_ids.shape)}")
        b, length = input_ids.shape
        if tuple(attention_mask.shape) != (b, length):
            raise ValueError(f"AudioBert: attention_mask has shape {tuple(attention_mask.shape)}; input_ids has "
                             f"{(b, length)}")
        if span_positions.ndim != 2 or span_positions.shape[0] != b:
            raise ValueError(f"AudioBert: span_positions must be [batch, spans] = [{b}, S]; got shape "
                             f"{tuple(span_positions.shape)}")
        slots = span_positions.shape[1]
        if audio is not None and (audio.ndim != 4 or tuple(audio.shape[:2]) != (b, slots)):
            raise ValueError(f"AudioBert: audio must be [batch, spans, frames, mel] = [{b}, {slots}, frames, mel] "
                             f"(span_positions is {tuple(span_positions.shape)}); got shape {tuple(audio.shape)}")
        width = self.ast.get("hidden_size", AST.hidden_size)
        if audio_vectors is not None and tuple(audio_vectors.shape) != (b, slots, width):
            raise ValueError(f"AudioBert: audio_vectors must be [batch, spans, ast hidden] = [{b}, {slots}, "
                             f"{width}] (span_positions is {tuple(span_positions.shape)}); got shape "
                             f"{tuple(audio_vectors.shape)}")
        if not isinstance(span_positions, jax.core.Tracer):
            pos = np.asarray(jax.device_get(span_positions))
            bad = np.argwhere((pos < -1) | (pos >= length))
            if len(bad):
                i, s = (int(v) for v in bad[0])
                raise ValueError(f"AudioBert: span_positions[{i}, {s}] = {int(pos[i, s])} is outside [-1, {length}) "
                                 f"(-1 = no span; input_ids have {length} tokens)")
        return b, length
