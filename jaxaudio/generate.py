"""Decoding with a KV cache: greedy, sampling and beam search, from token ids or an
`inputs_embeds` prefix (audio tokens in front of a prompt).

The prefix fills the cache in one call; then a `jax.lax.while_loop` feeds one token per
step to a `decode=True` clone of the model, until every sequence is done or
`max_new_tokens` are out. The cache holds `prefix + max_new_tokens` slots. Prefixes are
left-padded (`attention_mask` 0 on the left), as Hugging Face expects.

Greedy and beam search follow `transformers`' `generate(do_sample=False)` step for step,
so that the token ids are the same: beam scores are sums of log-probabilities; a
hypothesis ends at EOS or at `max_new_tokens`, ranked by `score / length**length_penalty`
with `length` its generated tokens, EOS included (transformers 5; older releases counted
the prompt too); only the best `num_beams` candidates of a step may finish; the search
stops when no running beam can beat the worst kept hypothesis at the current length
(`early_stopping=False`).

The model contract (`jaxaudio.models.llama.Llama`): `embed(input_ids)`, a `decode` field,
and `__call__(input_ids | inputs_embeds=, attention_mask= [batch, cache_len],
positions=, logits_to_keep=1)` returning float32 logits.
"""
import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.layers.lora import LoraConfig, lora as lora_context
from jaxaudio.models.llama import positions_from_mask

NEG = -1.0e9  # Hugging Face's "impossible" score; its float32 rounding is part of the semantics


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # [batch, max_new_tokens] int32, pad_token_id after EOS
    lengths: jax.Array  # [batch] generated tokens, EOS included
    scores: jax.Array  # [batch] greedy: sum of log-probs; beam: sum / length**length_penalty


def generate(model: nn.Module, params: Any, *, input_ids: jax.Array | None = None,
             inputs_embeds: jax.Array | None = None, attention_mask: jax.Array | None = None,
             max_new_tokens: int, eos_token_id: int | Sequence[int], pad_token_id: int, num_beams: int = 1,
             length_penalty: float = 1.0, do_sample: bool = False, temperature: float = 1.0,
             rng: jax.Array | None = None, lora: LoraConfig | None = None,
             lora_scale: Any = None) -> GenerateOutput:
    """Continue `input_ids [batch, prefix]` or `inputs_embeds [batch, prefix, hidden]`.

    `params`: the model's `params` collection. `attention_mask [batch, prefix]`: 1 for
    tokens, 0 for left padding. `do_sample` draws each token from `softmax(logits /
    temperature)` with `rng` (greedy only; no top-k/top-p). Compiled once per model, shape
    and setting (`max_new_tokens`, `num_beams`, token ids are static).

    `lora`: decode with the adapters in `params` (`jaxaudio.layers.lora`); `lora_scale`
    (default alpha / r) is a traced argument, so SALMONN's discounted scales share one
    compile. Pass them here rather than wrapping the call in `lora(...)`: the compiled loop
    is cached per setting, and a context outside it would be baked into the first trace.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("generate: pass exactly one of input_ids and inputs_embeds")
    if max_new_tokens < 1 or num_beams < 1:
        raise ValueError(f"generate: max_new_tokens ({max_new_tokens}) and num_beams ({num_beams}) must be >= 1")
    if do_sample and num_beams > 1:
        raise NotImplementedError("generate: sampling is implemented for num_beams=1 only")
    if do_sample and rng is None:
        raise ValueError("generate: do_sample=True needs rng")
    eos = tuple(int(e) for e in np.atleast_1d(eos_token_id))
    if inputs_embeds is None:  # outside the compiled loop, so token and embedding prompts share it
        inputs_embeds = model.apply({"params": params}, input_ids, method="embed")
    scale = jnp.asarray(lora.scale if lora_scale is None else lora_scale, jnp.float32) if lora else None
    return _generate(model, params, inputs_embeds, attention_mask, rng, scale,
                     max_new_tokens=int(max_new_tokens), eos=eos, pad=int(pad_token_id), num_beams=int(num_beams),
                     length_penalty=float(length_penalty), do_sample=bool(do_sample),
                     temperature=float(temperature), lora=lora)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos", "pad", "num_beams", "length_penalty",
                                             "do_sample", "temperature", "lora"))
def _generate(model, params, inputs_embeds, attention_mask, rng, lora_scale, *, max_new_tokens, eos, pad, num_beams,
              length_penalty, do_sample, temperature, lora) -> GenerateOutput:
    with lora_context(lora, scale=lora_scale):
        return _decode(model, params, inputs_embeds, attention_mask, rng, max_new_tokens, eos, pad, num_beams,
                       length_penalty, do_sample, temperature)


def _decode(model, params, inputs_embeds, attention_mask, rng, max_new_tokens, eos, pad, num_beams,
            length_penalty, do_sample, temperature) -> GenerateOutput:
    batch, prefix, width = inputs_embeds.shape
    mask = (jnp.ones((batch, prefix), jnp.int32) if attention_mask is None
            else attention_mask.astype(jnp.int32))
    n = max_new_tokens
    full_mask = jnp.concatenate([mask, jnp.ones((batch, n), jnp.int32)], axis=1)
    dec = model.clone(decode=True)

    def cache_shapes(rows):
        return jax.eval_shape(lambda: dec.init(jax.random.PRNGKey(0), inputs_embeds=jnp.zeros(
            (rows, prefix + n, width), inputs_embeds.dtype)))["cache"]
    shapes = cache_shapes(batch)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    logits, cache = _forward(dec, params, cache, {"inputs_embeds": inputs_embeds}, full_mask,
                             positions_from_mask(mask.astype(bool)))
    first_position = mask.sum(axis=1)  # the first new token follows the prefix's real tokens
    if num_beams == 1:
        return _greedy(dec, params, cache, logits, full_mask, first_position, rng, n, eos, pad, do_sample,
                       temperature)
    # Each cache entry's batch axis: 0, or 1 under a scanned stack's leading layer axis; none
    # for the write indices. Read off the shapes at two batch sizes.
    axes = jax.tree.map(lambda a, b: next((i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y), None),
                        shapes, cache_shapes(batch + 1))

    def rows(a, axis=0):  # every beam starts from its example's prefix
        return a if axis is None else jnp.repeat(a, num_beams, axis=axis)

    cache = jax.tree.map(rows, cache, axes)
    return _beam(dec, params, cache, axes, rows(logits), rows(full_mask), rows(first_position), n, eos, pad,
                 num_beams, length_penalty)


def _forward(dec, params, cache, inputs, full_mask, positions):
    """Write `inputs` into the cache; logits of the last position `[rows, vocab]` and the cache."""
    logits, updated = dec.apply({"params": params, "cache": cache}, **inputs, attention_mask=full_mask,
                                positions=positions, logits_to_keep=1, mutable=["cache"])
    return logits[:, -1], updated["cache"]


def _step(dec, params, cache, tokens, full_mask, first_position, t):
    """Feed `tokens [rows]`, the `t`-th generated token of each row."""
    positions = (first_position + t)[:, None]
    return _forward(dec, params, cache, {"input_ids": tokens[:, None]}, full_mask, positions)


def _is_eos(tokens: jax.Array, eos: tuple[int, ...]) -> jax.Array:
    if not eos:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[..., None] == jnp.asarray(eos, tokens.dtype), axis=-1)


def _greedy(dec, params, cache, logits, full_mask, first_position, rng, n, eos, pad, do_sample, temperature):
    batch = logits.shape[0]
    rng = jax.random.PRNGKey(0) if rng is None else rng

    def cond(s):
        return (s["t"] < n) & ~jnp.all(s["done"])

    def body(s):
        log_probs = jax.nn.log_softmax(s["logits"], axis=-1)
        rng, key = jax.random.split(s["rng"])
        if do_sample:
            token = jax.random.categorical(key, s["logits"] / temperature, axis=-1)
        else:
            token = jnp.argmax(s["logits"], axis=-1)
        done = s["done"]
        token = jnp.where(done, pad, token).astype(jnp.int32)
        picked = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
        out = dict(s, rng=rng, t=s["t"] + 1,
                   tokens=s["tokens"].at[:, s["t"]].set(token),
                   scores=s["scores"] + jnp.where(done, 0.0, picked),
                   lengths=s["lengths"] + (~done).astype(jnp.int32),
                   done=done | _is_eos(token, eos))
        out["logits"], out["cache"] = jax.lax.cond(
            cond(out), lambda: _step(dec, params, s["cache"], token, full_mask, first_position, s["t"]),
            lambda: (s["logits"], s["cache"]))
        return out

    state = dict(t=jnp.int32(0), logits=logits, cache=cache, rng=rng,
                 tokens=jnp.full((batch, n), pad, jnp.int32), done=jnp.zeros((batch,), bool),
                 lengths=jnp.zeros((batch,), jnp.int32), scores=jnp.zeros((batch,), jnp.float32))
    s = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(s["tokens"], s["lengths"], s["scores"])


def _gather(a: jax.Array, index: jax.Array) -> jax.Array:
    """`a [batch, beams, ...]` -> `[batch, k, ...]` picking `index [batch, k]` along the beams."""
    return jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=1)


def _reorder(c: jax.Array, axis: int | None, index: jax.Array) -> jax.Array:
    """Cache entry `c` with its rows (batch axis `axis`) picked by `index`."""
    if axis is None:
        return c
    if axis == 0:
        return jnp.take(c, index, axis=0)

    # A scanned stack `[layers, ..., rows, ...]`: a layer at a time, in place. A gather of the
    # whole stack kept a second cache and XLA's gather temporaries alive (8-layer 13B-wide
    # int8 decode, beam 4: temporaries 1.407 -> 1.250 GiB).
    def one(layer, c):
        rows = jnp.take(jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False), index, axis=axis - 1)
        return jax.lax.dynamic_update_index_in_dim(c, rows, layer, 0)
    return jax.lax.fori_loop(0, c.shape[0], one, c)


def _beam(dec, params, cache, cache_axes, logits, full_mask, first_position, n, eos, pad, k, length_penalty):
    """Hugging Face's vectorised beam search (`GenerationMixin._beam_search`), `early_stopping=False`."""
    rows, vocab = logits.shape
    batch = rows // k
    # Candidates per step: enough that `k` survive even if every beam's best is an EOS.
    k2 = max(2, 1 + len(eos)) * k
    top_k_mask = jnp.arange(k2) < k

    def body(s):
        t = s["t"]
        log_probs = jax.nn.log_softmax(s["logits"], axis=-1).reshape(batch, k, vocab)
        log_probs = (log_probs + s["running_scores"][:, :, None]).reshape(batch, k * vocab)
        cand_scores, cand_index = jax.lax.top_k(log_probs, k2)
        cand_beam, cand_token = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
        cand_seqs = _gather(s["running_seqs"], cand_beam).at[:, :, t].set(cand_token)
        hits = _is_eos(cand_token, eos) | (t + 1 >= n)

        # The best k candidates that did not just finish keep running.
        running = cand_scores + hits.astype(jnp.float32) * NEG
        keep = jax.lax.top_k(running, k)[1]
        running_seqs, running_scores, source = _gather(cand_seqs, keep), _gather(running, keep), _gather(cand_beam, keep)

        # Finished candidates among the best k join the kept hypotheses if they rank.
        just_finished = hits & top_k_mask[None, :]
        final = cand_scores / ((t + 1).astype(jnp.float32) ** length_penalty)
        final = final + (~s["improvable"]).astype(jnp.float32)[:, None] * NEG
        final = final + (~just_finished).astype(jnp.float32) * NEG
        merged_scores = jnp.concatenate([s["scores"], final], axis=1)
        best = jax.lax.top_k(merged_scores, k)[1]
        seqs = _gather(jnp.concatenate([s["seqs"], cand_seqs], axis=1), best)
        scores = _gather(merged_scores, best)
        finished = _gather(jnp.concatenate([s["finished"], just_finished], axis=1), best)
        lengths = _gather(jnp.concatenate([s["lengths"], jnp.broadcast_to(t + 1, (batch, k2))], axis=1), best)

        # Could the best running beam, ending now, still beat the worst kept hypothesis?
        best_possible = running_scores[:, :1] / ((t + 1).astype(jnp.float32) ** length_penalty)
        worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        improvable = s["improvable"] & jnp.any(best_possible > worst, axis=1)
        go_on = jnp.any(improvable) & ~jnp.all(hits)

        flat_source = (jnp.arange(batch)[:, None] * k + source).reshape(-1)
        cache = jax.tree.map(lambda c, axis: _reorder(c, axis, flat_source), s["cache"], cache_axes)
        # Unconditionally (the last iteration's forward is not read): a `cond` around the step
        # kept extra copies of the whole KV cache alive on TPU.
        logits, cache = _step(dec, params, cache, running_seqs[:, :, t].reshape(-1), full_mask, first_position, t)
        return dict(t=t + 1, go_on=go_on, logits=logits, cache=cache, running_seqs=running_seqs,
                    running_scores=running_scores, seqs=seqs, scores=scores, finished=finished, lengths=lengths,
                    improvable=improvable)

    # Only the first beam starts live, so the k beams do not all pick the same tokens.
    running_scores = jnp.where(jnp.arange(k) == 0, 0.0, NEG)[None, :].repeat(batch, axis=0).astype(jnp.float32)
    state = dict(t=jnp.int32(0), go_on=jnp.bool_(True), logits=logits, cache=cache,
                 running_seqs=jnp.full((batch, k, n), pad, jnp.int32), running_scores=running_scores,
                 seqs=jnp.full((batch, k, n), pad, jnp.int32), scores=jnp.full((batch, k), NEG, jnp.float32),
                 finished=jnp.zeros((batch, k), bool), lengths=jnp.zeros((batch, k), jnp.int32),
                 improvable=jnp.ones((batch,), bool))
    s = jax.lax.while_loop(lambda s: s["go_on"], body, state)
    return GenerateOutput(s["seqs"][:, 0], s["lengths"][:, 0], s["scores"][:, 0])
