"""SALMONN (Tang et al., 2024): Whisper + BEATs -> window-level Q-Former -> Vicuna with LoRA.

As bytedance/SALMONN's `models/salmonn.py` (reference/salmonn_beats.md §1):

  wave [batch, samples] at 16 kHz, lengths [batch] (real samples, at least 1 s)
  -> chunks of `chunk_seconds` (30 s: one chunk, as the original; longer audio gives
     more chunks, whose audio tokens are concatenated — the original truncates)
     each chunk: Whisper log-mel (zero-padded to the chunk) -> Whisper encoder (frozen)
                   [1500, 1280];
                 BEATs on the same samples (frozen) [1496, 768], the tokens past the
                   clip masked exactly (`beats.clip_token_padding`), so a clip padded to
                   the chunk gives what the clip alone gives in the original;
     -> connector (`SalmonnConnector`): ln_speech / ln_audio, zero pad, concatenate
        [1500, 2048] -> 17-frame windows, one query each -> speech_llama_proj
        -> 88 audio embeddings
  -> LLM (LLaMA / Vicuna, frozen, LoRA r 8 / alpha 32 / dropout 0.1 on q_proj, v_proj)
     over [BOS + "USER: <Speech>"][audio][`</Speech> instruction\\nASSISTANT:` + answer + `</s>`]

The text around the audio comes in two token arrays: `prefix_ids` (BOS and the prompt's
part before `<SpeechHere>`) and `suffix_ids` (the part after it, then in training the
answer and EOS, right-padded). The original tokenizes the two halves separately, and so
do the callers (`jaxaudio.tasks.salmonn`). Chunks past the end of a clip are masked out
of the LLM's attention. Positions count real tokens (`Llama`'s default), which equals
the original's `arange` wherever no padding sits inside the sequence; the original pads
a batch's prompt tails in place and so shifts rotary positions by the padding, which
this layout does not.

Sizes come from four dicts of module kwargs (`whisper`, `beats`, `connector`, `llm`);
`{}` is the original's size (whisper-large-v2, BEATs iter3+, the 2-layer window
Q-Former, Vicuna-13B's 5120 width with LLaMA-7B's other defaults: set the LLM from its
config). `beats=None` is SALMONN without BEATs (speech only).
"""
import dataclasses
import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaudio.features.whisper import SAMPLE_RATE, whisper_log_mel
from jaxaudio.generate import GenerateOutput, generate
from jaxaudio.layers.lora import LoraConfig, lora
from jaxaudio.models.audio_llm import llm_adapters, part_kwargs
from jaxaudio.models.beats import BEATs, beats_tokens, clip_token_padding
from jaxaudio.models.llama import Llama
from jaxaudio.models.qformer import SalmonnConnector, num_windows, window_frames
from jaxaudio.models.whisper import WhisperEncoder

# LoRA on the LLM's q_proj/v_proj (peft's default targets for LLaMA), as SALMONN's config.
DEFAULT_LORA = {"targets": r"llm/layers_\d+/attn/(query|value)", "rank": 8, "alpha": 32.0, "dropout": 0.1}
MIN_SECONDS = 1.0  # the original pads every clip to at least 1 s


class Salmonn(nn.Module):
    """The SALMONN model; see the module docstring.

    Fields: `whisper`, `beats` (None: no BEATs), `connector`, `llm` (kwargs of
    `WhisperEncoder`, `BEATs`, `SalmonnConnector`, `Llama`; json-serialisable, no dtypes;
    the connector's widths follow the parts), `lora` (`LoraConfig` kwargs; None: no
    adapters), `chunk_seconds` (the Whisper window, 30 s), `freeze_whisper` /
    `freeze_beats` (the original's flags: a frozen encoder runs in eval mode and passes no
    gradient). `dtype`/`param_dtype` apply to every part.

    Variables: `params/{whisper,beats,connector,llm}` (LoRA's `lora_a`/`lora_b` in `llm`).
    """
    whisper: dict = dataclasses.field(default_factory=dict)
    beats: dict | None = dataclasses.field(default_factory=dict)
    connector: dict = dataclasses.field(default_factory=dict)
    llm: dict = dataclasses.field(default_factory=dict)
    lora: dict | None = dataclasses.field(default_factory=lambda: dict(DEFAULT_LORA))
    chunk_seconds: float = 30.0
    freeze_whisper: bool = True
    freeze_beats: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __hash__(self):
        # The dict fields are unhashable; this lets a Salmonn be a static argument of `jax.jit`.
        fields = [self.whisper, self.beats, self.connector, self.llm, self.lora, self.chunk_seconds,
                  self.freeze_whisper, self.freeze_beats]
        return hash((json.dumps(fields, sort_keys=True), str(jnp.dtype(self.dtype)),
                     str(jnp.dtype(self.param_dtype)), self.name))

    @property
    def chunk_samples(self) -> int:
        return int(round(self.chunk_seconds * SAMPLE_RATE))

    @nn.nowrap
    def parts(self, names: tuple[str | None, ...] = (None,) * 4
              ) -> tuple[WhisperEncoder, BEATs | None, SalmonnConnector, Llama]:
        """The four sub-modules (unbound unless built inside `setup`), named `names`."""
        kw = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
        whisper = WhisperEncoder(**part_kwargs(self.whisper, "Salmonn", "whisper"), **kw, name=names[0])
        beats = (None if self.beats is None
                 else BEATs(**part_kwargs(self.beats, "Salmonn", "beats"), **kw, name=names[1]))
        llm = Llama(**part_kwargs(self.llm, "Salmonn", "llm"), **kw, name=names[3])
        conn = part_kwargs(self.connector, "Salmonn", "connector")
        for key, value in (("speech_width", whisper.d_model),
                           ("audio_width", None if beats is None else beats.encoder_embed_dim),
                           ("llm_width", llm.hidden_size)):
            if conn.setdefault(key, value) != value:
                raise ValueError(f"Salmonn: connector {key}={conn[key]} but the parts need {value}")
        return whisper, beats, SalmonnConnector(**conn, **kw, name=names[2]), llm

    @nn.nowrap
    def lora_config(self) -> LoraConfig | None:
        return None if self.lora is None else LoraConfig(**self.lora)

    @nn.nowrap
    def num_chunks(self, samples: int) -> int:
        return max(1, -(-samples // self.chunk_samples))

    @nn.nowrap
    def tokens_per_chunk(self) -> int:
        """Audio embeddings per chunk (88 for 30 s)."""
        _, beats, conn, _ = self.parts()
        frames = self.chunk_samples // 320  # log-mel hop 160, then the stride-2 conv
        if beats is not None:
            frames = max(frames, beats_tokens(self.chunk_samples, beats.input_patch_size))
        window = window_frames(conn.second_per_window, conn.frames_per_30s)
        stride = window_frames(conn.second_stride, conn.frames_per_30s)
        return num_windows(frames, window, stride) * conn.num_queries

    def setup(self):
        self.whisper_module, self.beats_module, self.connector_module, self.llm_module = self.parts(
            ("whisper", "beats", "connector", "llm"))

    def encode_audio(self, wave: jax.Array, lengths: jax.Array | None = None,
                     deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """`wave [batch, samples]` (16 kHz, zero-padded past `lengths [batch]`, default all)
        -> `(embeddings [batch, chunks * tokens_per_chunk, llm_width], mask [batch, same])`,
        mask False on the tokens of chunks that hold no audio (their embeddings are 0)."""
        if wave.ndim != 2:
            raise ValueError(f"Salmonn expects mono audio [batch, samples] at 16 kHz; got shape {wave.shape}")
        batch, samples = wave.shape
        chunk, chunks = self.chunk_samples, self.num_chunks(samples)
        if lengths is None:
            lengths = jnp.full((batch,), samples, jnp.int32)
        x = jnp.pad(wave, ((0, 0), (0, chunks * chunk - samples))).reshape(batch * chunks, chunk)
        real = jnp.clip(lengths[:, None] - chunk * jnp.arange(chunks)[None, :], 0, chunk).reshape(-1)
        present = real > 0
        # A chunk's audio is at least 1 s, as the original pads a clip; an empty chunk is
        # encoded as a whole one (finite values) and masked out below.
        real = jnp.where(present, jnp.maximum(real, min(chunk, int(MIN_SECONDS * SAMPLE_RATE))), chunk)

        whisper, beats = self.whisper_module, self.beats_module
        mel = whisper_log_mel(x, whisper.num_mel_bins, chunk_samples=chunk)
        speech = whisper(mel, train=not (deterministic or self.freeze_whisper))
        if self.freeze_whisper:
            speech = jax.lax.stop_gradient(speech)
        audio = audio_mask = None
        if beats is not None:
            padding = clip_token_padding(real, beats_tokens(chunk, beats.input_patch_size), beats.input_patch_size)
            audio, _ = beats(x, train=not (deterministic or self.freeze_beats), token_padding=padding)
            if self.freeze_beats:
                audio = jax.lax.stop_gradient(audio)
            audio_mask = ~padding
        h = self.connector_module(speech, audio, deterministic=deterministic, audio_mask=audio_mask)
        per_chunk = h.shape[1]
        mask = jnp.repeat(present.reshape(batch, chunks), per_chunk, axis=1)
        h = h.reshape(batch, chunks * per_chunk, h.shape[-1])
        return jnp.where(mask[..., None], h, 0).astype(h.dtype), mask

    def embed_text(self, input_ids: jax.Array) -> jax.Array:
        """`[batch, len]` -> the LLM's token embeddings `[batch, len, llm_width]`."""
        return self.llm_module.embed(input_ids)

    def __call__(self, wave: jax.Array, lengths: jax.Array | None, prefix_ids: jax.Array, suffix_ids: jax.Array,
                 suffix_mask: jax.Array | None = None, prefix_mask: jax.Array | None = None,
                 deterministic: bool = True, lora_scale: Any = None) -> jax.Array:
        """`wave [batch, samples]`, `lengths [batch]` (None: whole), `prefix_ids [batch, p]`
        (BOS + the prompt before the audio), `suffix_ids [batch, s]` (the prompt after the
        audio, answer, EOS; right-padded), masks (1 = token; default all) -> float32 logits
        `[batch, p + audio tokens + s, vocab]`.

        `deterministic=False` (training) applies the connector's and LoRA's dropout (rng
        `dropout`). `lora_scale`: None = alpha / rank.
        """
        x, mask = self.input_embeddings(wave, lengths, prefix_ids, suffix_ids, suffix_mask, prefix_mask,
                                        deterministic)
        with lora(self.lora_config(), scale=lora_scale, deterministic=deterministic):
            return self.llm_module(inputs_embeds=x, attention_mask=mask)

    def input_embeddings(self, wave, lengths, prefix_ids, suffix_ids, suffix_mask=None, prefix_mask=None,
                         deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """The LLM's input `[batch, p + audio + s, llm_width]` and its mask (int32)."""
        audio, audio_mask = self.encode_audio(wave, lengths, deterministic)
        prefix, suffix = self.embed_text(prefix_ids), self.embed_text(suffix_ids)
        ones = functools.partial(jnp.ones, dtype=jnp.int32)
        mask = jnp.concatenate([
            ones(prefix_ids.shape) if prefix_mask is None else prefix_mask.astype(jnp.int32),
            audio_mask.astype(jnp.int32),
            ones(suffix_ids.shape) if suffix_mask is None else suffix_mask.astype(jnp.int32)], axis=1)
        return jnp.concatenate([prefix, audio.astype(prefix.dtype), suffix], axis=1), mask


def answer(module: Salmonn, variables: dict[str, Any], wave: jax.Array, lengths: jax.Array | None,
           prefix_ids: jax.Array, prompt_ids: jax.Array, prompt_mask: jax.Array | None = None, *,
           eos_token_id: int | tuple[int, ...], pad_token_id: int, num_beams: int = 4, max_new_tokens: int = 200,
           length_penalty: float = 1.0, lora_scale: Any = None) -> GenerateOutput:
    """Decode one answer per clip; traceable, so it runs inside a jitted eval step.

    `prefix_ids [batch, p]` (BOS + the prompt before the audio), `prompt_ids [batch, q]`
    (the prompt after the audio, LEFT-padded so each row ends with its last prompt token;
    `prompt_mask` 1 = token) -> `GenerateOutput` (`tokens [batch, max_new_tokens]`,
    `pad_token_id` after EOS). The original's decoding: beam 4, 200 new tokens, stop at
    EOS (its stop rule looks at sequence 0 only; with one clip, as its inference runs,
    that is the same). `lora_scale` discounts the adapters (activation tuning).
    """
    x, mask = module.apply(variables, wave, lengths, prefix_ids, prompt_ids, prompt_mask,
                           method=Salmonn.input_embeddings)
    llm_params = variables["params"]["llm"]
    return generate(module.parts()[3], llm_params, inputs_embeds=x, attention_mask=mask,
                    max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                    num_beams=num_beams, length_penalty=length_penalty,
                    lora=llm_adapters(module.lora_config(), llm_params), lora_scale=lora_scale)
