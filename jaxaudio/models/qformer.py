"""The Q-Former family in Flax Linen: BLIP-2's Q-Former, BAT's projector, SALMONN's
auditory fusion and window-level Q-Former.

`QFormer` is Hugging Face's `Blip2QFormerModel` for query tokens only:

  query_embeds [batch, queries, hidden] -> LayerNorm -> dropout
  -> num_layers post-LN layers, each: self-attention over the queries; cross-attention
     to encoder_hidden_states [batch, frames, encoder_hidden_size] in layers whose index
     is a multiple of cross_attention_frequency (optional encoder mask [batch, frames]);
     the query feed-forward (`intermediate_query`, `output_query`)
  -> last_hidden_state [batch, queries, hidden]

Left out of Hugging Face's model: text inputs (`input_ids`, the text embeddings and the
text feed-forward `intermediate`/`output` of `use_qformer_text_input`), the
self-attention mask over the queries, `query_length` (all positions are queries),
attention/hidden-state outputs and `pooler_output` (it is `last_hidden_state[:, 0]`).

Systems built on it:
  `BatProjector` (BAT, SLAM-LLM's `EncoderProjectorQFormer`): 64 learned queries ->
    QFormer(8 layers, cross every 2nd) over Spatial-AST tokens [batch, 515, 768]
    -> Linear(768 -> llm) -> LayerNorm(eps 1e-5) -> [batch, 64, llm].
  `AuditoryFusion` (SALMONN): LayerNorm Whisper [batch, 1500, 1280] and BEATs
    [batch, T, 768] features, zero-pad the shorter at the end, concatenate -> 2048 wide.
  `WindowQFormer` (SALMONN): the fused frames cut into windows of 17 frames (stride 17),
    each window a batch item for a 2-layer QFormer with cross-attention in every layer
    and 1 query token, then Linear(768 -> llm) -> [batch, windows * queries, llm].
  `SalmonnConnector`: AuditoryFusion then WindowQFormer (SALMONN's `_encode_auditory_feature`).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaudio.layers import MultiHeadAttention, constrain, dense, layer_norm, param, remat_block
from jaxaudio.layers.transformer import ACT
from jaxaudio.models.bert import BertLayer


def window_frames(seconds: float, frames_per_30s: int = 1500) -> int:
    """Frames in `seconds` of encoder output, as SALMONN computes its window and stride:
    `round(frames_per_30s * seconds / 30)` (Whisper gives 1500 frames per 30 s; 1/3 s -> 17)."""
    return round(frames_per_30s * seconds / 30.0)


def num_windows(frames: int, window: int, stride: int) -> int:
    """Whole windows in `frames` (torch `unfold`: a partial last window is dropped)."""
    if frames < window:
        raise ValueError(f"{frames} frames are fewer than one window of {window}")
    return (frames - window) // stride + 1


def split_windows(x: jax.Array, window: int, stride: int) -> jax.Array:
    """`[batch, frames, ...] -> [batch, windows, window, ...]`, frames past the last whole
    window dropped (SALMONN's `F.unfold` over time)."""
    n = num_windows(x.shape[1], window, stride)
    index = stride * jnp.arange(n)[:, None] + jnp.arange(window)[None, :]
    return jnp.take(x, index, axis=1)


def pad_and_concat(speech: jax.Array, audio: jax.Array) -> jax.Array:
    """`[batch, ts, a]`, `[batch, ta, b]` -> `[batch, max(ts, ta), a + b]`: the shorter
    sequence is zero-padded at the end (SALMONN pads after the LayerNorms)."""
    length = max(speech.shape[1], audio.shape[1])

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))

    return jnp.concatenate([pad(speech), pad(audio).astype(speech.dtype)], axis=-1)


class QFormerLayer(BertLayer):
    """A Q-Former layer: `BertLayer`'s self-attention, optional cross-attention, and the
    query feed-forward. `x [batch, queries, hidden]`, `context [batch, frames, width]`.

    Sub-modules (Hugging Face's names in brackets) beyond `BertLayer`'s `attention` and
    `attention_norm`: `crossattention` (crossattention.attention.* / .self.* and
    crossattention.output.dense), `crossattention_norm` (crossattention.output.LayerNorm),
    `intermediate_query`, `output_query` (.dense), `output_query_norm` (output_query.LayerNorm).
    `BertLayer`'s text feed-forward (`intermediate`, `output`) is never called, so it has
    no parameters.
    """
    cross_attention: bool = False

    def setup(self):
        super().setup()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.cross_attention:
            self.crossattention = MultiHeadAttention(self.num_heads, implementation=self.attention_impl,
                                                     dropout_rate=self.attention_dropout, **kw)
            self.crossattention_norm = layer_norm(self.eps, **kw)
        self.intermediate_query = dense(self.intermediate_size, ("embed", "mlp"), name=None, **kw)
        self.output_query = dense(self.hidden_size, ("mlp", "embed"), name=None, **kw)
        self.output_query_norm = layer_norm(self.eps, **kw)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, context_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """`context_mask` broadcasts to `[batch, heads, queries, frames]` (True = attend)."""
        x = constrain(x, ACT)
        x = self.attention_block(self.attention, self.attention_norm, x, None, None, deterministic)
        if self.cross_attention:
            x = self.attention_block(self.crossattention, self.crossattention_norm, x, context, context_mask,
                                     deterministic)
        x = self.feed_forward(self.intermediate_query, self.output_query, self.output_query_norm, x, deterministic)
        return constrain(x, ACT)


class QFormer(nn.Module):
    """Hugging Face's `Blip2QFormerModel` on query embeddings; fields mirror
    `Blip2QFormerConfig` (defaults are its defaults).

    `__call__(query_embeds [batch, queries, hidden], encoder_hidden_states
    [batch, frames, encoder_hidden_size], encoder_mask [batch, frames] (1 = attend))`
    -> `[batch, queries, hidden]`. Training (`deterministic=False`) needs the rng `dropout`.
    """
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    encoder_hidden_size: int = 1408
    cross_attention_frequency: int = 2
    hidden_act: str = "gelu"
    eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    attention_impl: str | None = None
    remat: str | bool = "none"  # jaxaudio.layers.remat: none, full, dots, dots_no_batch (True = full)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_embeds: jax.Array, encoder_hidden_states: jax.Array,
                 encoder_mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        if query_embeds.shape[-1] != self.hidden_size:
            raise ValueError(f"QFormer: query_embeds has width {query_embeds.shape[-1]}, hidden_size is "
                             f"{self.hidden_size}")
        if encoder_hidden_states.shape[-1] != self.encoder_hidden_size:
            raise ValueError(f"QFormer: encoder_hidden_states has width {encoder_hidden_states.shape[-1]}, "
                             f"encoder_hidden_size is {self.encoder_hidden_size}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layer_norm(self.eps, name="layernorm", **kw)(query_embeds)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        context = constrain(encoder_hidden_states.astype(self.dtype), ACT)
        mask = None if encoder_mask is None else encoder_mask[:, None, None, :].astype(bool)
        layer = remat_block(QFormerLayer, self.remat, static_argnums=(4,), field="QFormer.remat")
        for i in range(self.num_layers):
            x = layer(self.hidden_size, self.num_heads, self.intermediate_size, self.hidden_act, self.eps,
                      self.dropout, self.attention_impl, self.attention_dropout,
                      cross_attention=i % self.cross_attention_frequency == 0, name=f"layers_{i}",
                      **kw)(x, context, mask, deterministic)
        return x


class BatProjector(nn.Module):
    """BAT's projector (SLAM-LLM `EncoderProjectorQFormer`): `num_queries` learned queries
    (`query`, init N(0, 1)) -> `qformer` -> `linear` (hidden -> llm_width) -> `norm`.

    `x [batch, tokens, encoder_hidden_size]` (Spatial-AST: 515 x 768), `mask [batch, tokens]`
    (BAT passes none) -> `[batch, num_queries, llm_width]`.
    """
    llm_width: int = 4096
    num_queries: int = 64
    hidden_size: int = 768
    num_layers: int = 8
    num_heads: int = 12
    intermediate_size: int = 3072
    encoder_hidden_size: int = 768
    cross_attention_frequency: int = 2
    eps: float = 1e-12
    norm_eps: float = 1e-5
    dropout: float = 0.1
    attention_dropout: float = 0.1
    attention_impl: str | None = None
    remat: str | bool = "none"  # jaxaudio.layers.remat: none, full, dots, dots_no_batch (True = full)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        query = self.param("query", param(nn.initializers.normal(1.0), ("tokens", "embed")),
                           (self.num_queries, self.hidden_size), self.param_dtype)
        query = jnp.broadcast_to(query.astype(self.dtype), (x.shape[0],) + query.shape)
        h = QFormer(self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size,
                    self.encoder_hidden_size, self.cross_attention_frequency, "gelu", self.eps, self.dropout,
                    self.attention_dropout, self.attention_impl, remat=self.remat, name="qformer",
                    **kw)(query, x, mask, deterministic)
        h = dense(self.llm_width, ("embed", "mlp"), name="linear", **kw)(h)
        return constrain(layer_norm(self.norm_eps, name="norm", **kw)(h), ACT)


class AuditoryFusion(nn.Module):
    """SALMONN's fusion of its two encoders: `ln_speech` on Whisper's output, `ln_audio`
    on BEATs', the shorter zero-padded at the end, concatenated on features.

    `speech [batch, ts, speech_width]`, `audio [batch, ta, audio_width]` ->
    `[batch, max(ts, ta), speech_width + audio_width]`. With `audio_width=None` (SALMONN
    without BEATs) `audio` is None and the output is `ln_speech(speech)`. `audio_mask
    [batch, ta]` (True = a real token) zeroes the other tokens after `ln_audio`, so a clip
    padded to a fixed length gets the zeros the original's unpadded clip gets.
    """
    speech_width: int = 1280
    audio_width: int | None = 768
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, speech: jax.Array, audio: jax.Array | None = None,
                 audio_mask: jax.Array | None = None) -> jax.Array:
        if (audio is None) != (self.audio_width is None):
            raise ValueError(f"AuditoryFusion: audio_width={self.audio_width} but audio features were "
                             f"{'not ' if audio is None else ''}given")
        for name, x, width in (("speech", speech, self.speech_width), ("audio", audio, self.audio_width)):
            if x is not None and x.shape[-1] != width:
                raise ValueError(f"AuditoryFusion: {name} features have width {x.shape[-1]}, expected {width}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        speech = layer_norm(self.eps, name="ln_speech", **kw)(speech)
        if audio is None:
            return constrain(speech, ACT)
        audio = layer_norm(self.eps, name="ln_audio", **kw)(audio)
        if audio_mask is not None:
            audio = jnp.where(audio_mask[..., None], audio, 0).astype(audio.dtype)
        return constrain(pad_and_concat(speech, audio), ACT)


class WindowQFormer(nn.Module):
    """SALMONN's window-level Q-Former.

    `x [batch, frames, encoder_hidden_size]` (fused features), `mask [batch, frames]`
    (1 = a real frame; SALMONN passes none) -> `[batch, windows * num_queries, llm_width]`,
    windows = (frames - window) // stride + 1 with window/stride = `window_frames` of
    `second_per_window`/`second_stride`. Each window is a batch item of `speech_qformer`
    with the `speech_query_tokens`; `speech_llama_proj` maps to the LLM width. A window
    with no real frame attends uniformly to its (padding) frames; `window_mask` says
    which outputs come from real frames.
    """
    llm_width: int = 5120
    num_queries: int = 1
    second_per_window: float = 0.333333
    second_stride: float = 0.333333
    frames_per_30s: int = 1500
    hidden_size: int = 768
    num_layers: int = 2
    num_heads: int = 12
    intermediate_size: int = 3072
    encoder_hidden_size: int = 2048
    cross_attention_frequency: int = 1
    eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    attention_impl: str | None = None
    remat: str | bool = "none"  # jaxaudio.layers.remat: none, full, dots, dots_no_batch (True = full)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def window(self) -> int:
        return window_frames(self.second_per_window, self.frames_per_30s)

    @property
    def stride(self) -> int:
        return window_frames(self.second_stride, self.frames_per_30s)

    def window_mask(self, mask: jax.Array) -> jax.Array:
        """Frame mask `[batch, frames]` -> output mask `[batch, windows * num_queries]`:
        True where the window holds at least one real frame."""
        any_real = split_windows(mask.astype(bool), self.window, self.stride).any(axis=-1)
        return jnp.repeat(any_real, self.num_queries, axis=1)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, width = x.shape[0], x.shape[-1]
        windows = split_windows(x, self.window, self.stride)  # [batch, n, window, width]
        n = windows.shape[1]
        frames = windows.reshape(batch * n, self.window, width)
        if mask is not None:
            mask = split_windows(mask, self.window, self.stride).reshape(batch * n, self.window)
        query = self.param("speech_query_tokens", param(nn.initializers.normal(0.02), ("tokens", "embed")),
                           (self.num_queries, self.hidden_size), self.param_dtype)
        query = jnp.broadcast_to(query.astype(self.dtype), (batch * n,) + query.shape)
        h = QFormer(self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size,
                    self.encoder_hidden_size, self.cross_attention_frequency, "gelu", self.eps, self.dropout,
                    self.attention_dropout, self.attention_impl, remat=self.remat, name="speech_qformer",
                    **kw)(query, frames, mask, deterministic)
        h = dense(self.llm_width, ("embed", "mlp"), name="speech_llama_proj", **kw)(h)
        return constrain(h.reshape(batch, n * self.num_queries, self.llm_width), ACT)


class SalmonnConnector(nn.Module):
    """SALMONN between its encoders and the LLM (`_encode_auditory_feature`): `fusion`
    (AuditoryFusion) then `window_qformer` (WindowQFormer, encoder width
    speech_width + audio_width).

    `speech [batch, 1500, speech_width]`, `audio [batch, ta, audio_width]`,
    `mask [batch, max(1500, ta)]` (optional, the Q-Former's frame mask), `audio_mask
    [batch, ta]` (optional, see `AuditoryFusion`) -> `[batch, windows * num_queries, llm_width]`.
    """
    speech_width: int = 1280
    audio_width: int | None = 768
    llm_width: int = 5120
    num_queries: int = 1
    second_per_window: float = 0.333333
    second_stride: float = 0.333333
    frames_per_30s: int = 1500
    hidden_size: int = 768
    num_layers: int = 2
    num_heads: int = 12
    intermediate_size: int = 3072
    fusion_eps: float = 1e-5
    eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    attention_impl: str | None = None
    remat: str | bool = "none"  # jaxaudio.layers.remat: none, full, dots, dots_no_batch (True = full)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, speech: jax.Array, audio: jax.Array | None = None, mask: jax.Array | None = None,
                 deterministic: bool = True, audio_mask: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        fused = AuditoryFusion(self.speech_width, self.audio_width, self.fusion_eps, name="fusion",
                               **kw)(speech, audio, audio_mask)
        return WindowQFormer(self.llm_width, self.num_queries, self.second_per_window, self.second_stride,
                             self.frames_per_30s, self.hidden_size, self.num_layers, self.num_heads,
                             self.intermediate_size, self.speech_width + (self.audio_width or 0), 1, self.eps,
                             self.dropout, self.attention_dropout, self.attention_impl, remat=self.remat,
                             name="window_qformer", **kw)(fused, mask, deterministic)
