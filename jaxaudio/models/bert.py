"""BERT (Devlin et al., 2019) in Flax Linen, as Hugging Face's `BertModel` and two heads.

  input_ids [batch, len] (or inputs_embeds [batch, len, hidden])
  -> + position and token-type embeddings -> LayerNorm -> dropout
  -> num_layers post-LN `BertLayer`s (self-attention, then feed-forward; each sub-block is
     dense -> dropout -> LayerNorm(residual + .))
  -> last_hidden_state [batch, len, hidden]
  -> optional pooler: tanh(dense(last_hidden_state[:, 0]))          [batch, hidden]
  -> optional head: "mlm" (`BertForMaskedLM`: dense -> act -> LayerNorm -> the word
     embeddings transposed + bias -> [batch, len, vocab]) or "token_classification"
     (`BertForTokenClassification`: dropout -> dense -> [batch, len, num_labels]).

AudioBERT injects an audio embedding as a token: pass `inputs_embeds`; position and
token-type embeddings are still added, as Hugging Face does.

In training, hidden dropout (`hidden_dropout_prob`) and attention-probability dropout
(`attention_probs_dropout_prob`) apply where Hugging Face applies them.
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaudio.layers import MultiHeadAttention, activation, constrain, dense, layer_norm, param, remat_block
from jaxaudio.layers.transformer import ACT

HEADS = ("none", "mlm", "token_classification")
EMBED_INIT = nn.initializers.normal(0.02)


@flax.struct.dataclass
class BertOutputs:
    """`last_hidden_state [batch, len, hidden]`; `pooler_output [batch, hidden]` (None
    without a pooler); `logits` of the head (None with `head="none"`)."""
    last_hidden_state: jax.Array
    pooler_output: jax.Array | None = None
    logits: jax.Array | None = None


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout.

    `attend` reuses the word embedding matrix as the MLM decoder (tied weights).
    """
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        # Raw tables (not nn.Embed) so that they exist after an init with inputs_embeds only.
        def table(name, n, axes):
            return self.param(name, param(EMBED_INIT, axes), (n, self.hidden_size), self.param_dtype)

        self.word_embeddings = table("word_embeddings", self.vocab_size, ("vocab", "embed"))
        self.position_embeddings = table("position_embeddings", self.max_position_embeddings, ("tokens", "embed"))
        self.token_type_embeddings = table("token_type_embeddings", self.type_vocab_size, ("tokens", "embed"))
        self.norm = layer_norm(self.eps, dtype=self.dtype, param_dtype=self.param_dtype)
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, input_ids: jax.Array | None, inputs_embeds: jax.Array | None, token_type_ids: jax.Array,
                 position_ids: jax.Array, deterministic: bool) -> jax.Array:
        """ids `[batch, len]` (or embeds `[batch, len, hidden]`) -> `[batch, len, hidden]`."""
        if inputs_embeds is None:
            inputs_embeds = self.words(input_ids)
        x = inputs_embeds.astype(self.dtype)
        x = x + jnp.take(self.token_type_embeddings, token_type_ids, axis=0).astype(self.dtype)
        x = x + jnp.take(self.position_embeddings, position_ids, axis=0).astype(self.dtype)
        return self.drop(self.norm(x), deterministic=deterministic)

    def words(self, input_ids: jax.Array) -> jax.Array:
        """The word embeddings alone: `[batch, len]` -> `[batch, len, hidden]` (param dtype)."""
        return jnp.take(self.word_embeddings, input_ids, axis=0)

    def attend(self, h: jax.Array) -> jax.Array:
        """`[..., hidden] -> [..., vocab]` through the transposed word embeddings."""
        return jnp.einsum("...e,ve->...v", h.astype(self.dtype), self.word_embeddings.astype(self.dtype))


class BertLayer(nn.Module):
    """Post-LN encoder layer: `x [batch, len, hidden] -> [batch, len, hidden]`.

    Sub-modules (Hugging Face's names in brackets): `attention` (attention.self.* and
    attention.output.dense), `attention_norm` (attention.output.LayerNorm),
    `intermediate` (intermediate.dense), `output` (output.dense), `output_norm`
    (output.LayerNorm). A subclass adds sub-modules in `setup` (call `super().setup()`)
    and composes `attention_block` / `feed_forward` with its own (the BLIP-2 Q-Former adds
    cross-attention and a second feed-forward for its query tokens).
    """
    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    eps: float = 1e-12
    dropout: float = 0.0
    attention_impl: str | None = None
    attention_dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.attention = MultiHeadAttention(self.num_heads, implementation=self.attention_impl,
                                            dropout_rate=self.attention_dropout, **kw)
        self.attention_norm = layer_norm(self.eps, **kw)
        self.intermediate = dense(self.intermediate_size, ("embed", "mlp"), name=None, **kw)
        self.output = dense(self.hidden_size, ("mlp", "embed"), name=None, **kw)
        self.output_norm = layer_norm(self.eps, **kw)
        self.drop = nn.Dropout(self.dropout)

    def attention_block(self, attention: nn.Module, norm: nn.Module, x: jax.Array, context: jax.Array | None,
                        mask: jax.Array | None, deterministic: bool) -> jax.Array:
        """`norm(x + dropout(attention(x, context)))`; mask broadcasts to `[batch, heads, q, kv]`."""
        h = attention(x, context, mask=mask, deterministic=deterministic)
        return norm(x + self.drop(h, deterministic=deterministic))

    def feed_forward(self, intermediate: nn.Module, output: nn.Module, norm: nn.Module, x: jax.Array,
                     deterministic: bool) -> jax.Array:
        """`norm(x + dropout(output(act(intermediate(x)))))`."""
        h = output(activation(self.hidden_act)(intermediate(x)))
        return norm(x + self.drop(h, deterministic=deterministic))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        x = constrain(x, ACT)
        x = self.attention_block(self.attention, self.attention_norm, x, None, mask, deterministic)
        x = self.feed_forward(self.intermediate, self.output, self.output_norm, x, deterministic)
        return constrain(x, ACT)


class BertMlmHead(nn.Module):
    """`BertForMaskedLM`'s head: `[batch, len, hidden] -> [batch, len, vocab]` with the
    decoder tied to the word embeddings (`embeddings.attend`) and its own bias."""
    vocab_size: int
    hidden_size: int
    hidden_act: str = "gelu"
    eps: float = 1e-12
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, embeddings: BertEmbeddings) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Two names for one width: a kernel's axes must differ to be shardable.
        h = dense(self.hidden_size, ("embed", "mlp"), name="transform", **kw)(x)
        h = layer_norm(self.eps, name="transform_norm", **kw)(activation(self.hidden_act)(h))
        bias = self.param("bias", param(nn.initializers.zeros, ("vocab",)), (self.vocab_size,), self.param_dtype)
        return embeddings.attend(h) + bias.astype(self.dtype)


class Bert(nn.Module):
    """Hugging Face's `BertModel`, with `head` one of "none", "mlm" (`BertForMaskedLM`)
    or "token_classification" (`BertForTokenClassification`). Fields mirror `BertConfig`
    (`hidden_act` is a name for `jaxaudio.layers.activation`: gelu, gelu_tanh, relu, silu).

    `__call__(input_ids [batch, len] or inputs_embeds [batch, len, hidden],
    attention_mask [batch, len] (1 = attend), token_type_ids, position_ids [batch, len])`
    -> `BertOutputs`. Training (`deterministic=False`) needs the rng `dropout`.
    `embed(input_ids)` runs the embedding module alone (AudioBERT's first pass).
    """
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12
    dropout: float = 0.1
    pooler: bool = True
    head: str = "none"
    num_labels: int = 2
    classifier_dropout: float | None = None  # None: `dropout`, as Hugging Face
    attention_dropout: float = 0.1
    attention_impl: str | None = None
    remat: str | bool = "none"  # jaxaudio.layers.remat: none, full, dots, dots_no_batch (True = full)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
                 inputs_embeds: jax.Array | None = None, deterministic: bool = True,
                 _embed: str | None = None) -> BertOutputs:
        # `_embed` ("words" / "full"): stop at the embedding module (see `embed`).
        if self.head not in HEADS:
            raise ValueError(f"Bert: head={self.head!r}; choose one of {HEADS}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Bert: pass exactly one of input_ids [batch, len] and inputs_embeds [batch, len, hidden]")
        if inputs_embeds is not None and inputs_embeds.shape[-1] != self.hidden_size:
            raise ValueError(f"Bert: inputs_embeds has width {inputs_embeds.shape[-1]}, hidden_size is "
                             f"{self.hidden_size}")
        batch, length = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if length > self.max_position_embeddings:
            raise ValueError(f"Bert: {length} tokens exceed max_position_embeddings={self.max_position_embeddings}")
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length), (batch, length))
        if token_type_ids is None:
            token_type_ids = jnp.zeros((batch, length), jnp.int32)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        embeddings = BertEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                                    self.type_vocab_size, self.eps, self.dropout, name="embeddings", **kw)
        if _embed == "words":
            return BertOutputs(last_hidden_state=embeddings.words(input_ids))
        x = embeddings(input_ids, inputs_embeds, token_type_ids, position_ids, deterministic)
        if _embed is not None:
            return BertOutputs(last_hidden_state=x)
        mask = None if attention_mask is None else attention_mask[:, None, None, :].astype(bool)
        layer = remat_block(BertLayer, self.remat, static_argnums=(3,), field="Bert.remat")
        for i in range(self.num_layers):
            x = layer(self.hidden_size, self.num_heads, self.intermediate_size, self.hidden_act, self.eps,
                      self.dropout, self.attention_impl, self.attention_dropout, name=f"layers_{i}",
                      **kw)(x, mask, deterministic)

        pooled = None
        if self.pooler:
            pooled = jnp.tanh(dense(self.hidden_size, ("embed", "mlp"), name="pooler", **kw)(x[:, 0]))
        logits = None
        if self.head == "mlm":
            logits = BertMlmHead(self.vocab_size, self.hidden_size, self.hidden_act, self.eps, name="mlm",
                                 **kw)(x, embeddings)
        elif self.head == "token_classification":
            rate = self.dropout if self.classifier_dropout is None else self.classifier_dropout
            h = nn.Dropout(rate)(x, deterministic=deterministic)
            logits = dense(self.num_labels, ("embed", "classes"), name="classifier", **kw)(h)
        return BertOutputs(last_hidden_state=x, pooler_output=pooled,
                           logits=None if logits is None else logits.astype(jnp.float32))

    def embed(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None,
              position_ids: jax.Array | None = None, deterministic: bool = True,
              words_only: bool = False) -> jax.Array:
        """The embedding module alone, with the parameters `__call__` uses (`embeddings/...`):
        `input_ids [batch, len]` -> `[batch, len, hidden]`, word + position + token-type
        embeddings, LayerNorm and dropout (Hugging Face's `bert.embeddings(input_ids)`), or
        with `words_only` the word embeddings alone (`bert.embeddings.word_embeddings`).
        AudioBERT overwrites rows of it and passes the result back as `inputs_embeds`."""
        return self(input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                    deterministic=deterministic, _embed="words" if words_only else "full").last_hidden_state
