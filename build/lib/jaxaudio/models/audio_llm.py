"""What the audio-language models (BAT, SALMONN) share around their LLM.

Both put audio embeddings into a LLaMA's input sequence, train it with a loss on the
answer tokens only, and decode answers with the LLM's LoRA adapters. The pieces here are
tokenizer-agnostic: they take token ids and logits.
"""
import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaudio.layers.lora import LoraConfig, adapted_modules
from jaxaudio.models.llama import causal_lm_loss

IGNORE = -100  # label of positions without loss (Hugging Face's ignore_index)


def part_kwargs(kwargs: dict[str, Any], system: str, part: str) -> dict[str, Any]:
    """A copy of one part's module kwargs; a part may not set its own dtypes (the system's
    `dtype`/`param_dtype` apply to every part)."""
    bad = sorted({"dtype", "param_dtype"} & set(kwargs))
    if bad:
        raise ValueError(f"{system}: {part} kwargs must not set {bad}; {system}'s own dtype/param_dtype apply "
                         "to every part")
    return dict(kwargs)


def build_sequence(prompt_ids: Sequence[int], answer_ids: Sequence[int], bos: int | None, eos: int, max_len: int,
                   pad: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One example's text: `(input_ids, attention_mask, labels)`, each `[max_len]` int32.

    input_ids = [BOS] + prompt + answer + [EOS] (no BOS when `bos` is None: SALMONN's BOS
    sits before the audio), right-padded with `pad`; labels are the answer and EOS tokens
    at their positions and `IGNORE` elsewhere (BOS, prompt, padding). A longer example is
    cut at `max_len` (losing the end of the answer and the EOS).
    """
    head = [] if bos is None else [bos]
    ids = [*head, *prompt_ids, *answer_ids, eos][:max_len]
    n_prompt = len(head) + len(prompt_ids)
    labels = [IGNORE] * min(n_prompt, len(ids)) + ids[n_prompt:]
    fill = max_len - len(ids)
    return (np.asarray(ids + [pad] * fill, np.int32), np.asarray([1] * len(ids) + [0] * fill, np.int32),
            np.asarray(labels + [IGNORE] * fill, np.int32))


def text_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy on the labelled tokens: `logits [batch, positions, vocab]` over a
    sequence that ends with the text, `labels [batch, len]` for its last `len` positions
    (`build_sequence`) -> `(mean loss, counted tokens)`.

    The positions before the text (audio, and SALMONN's prompt head) carry no labels, so
    they are dropped and `causal_lm_loss` shifts as Hugging Face does: logits at t predict
    t + 1. The text's first token is never a target (BOS, or a prompt token).
    """
    return causal_lm_loss(logits[:, logits.shape[1] - labels.shape[1]:], labels, IGNORE)


def answer_token_stats(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per example: summed cross-entropy, correct argmax predictions and counted tokens
    over the labelled text (`logits`, `labels` as in `text_loss`), each `[batch]`."""
    text = logits[:, logits.shape[1] - labels.shape[1]:-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(text, jnp.where(valid, targets, 0))
    correct = (jnp.argmax(text, axis=-1) == targets) & valid
    return jnp.sum(jnp.where(valid, ce, 0.0), 1), jnp.sum(correct, 1), jnp.sum(valid, 1)


def llm_adapters(config: LoraConfig | None, llm_params: Any) -> LoraConfig | None:
    """The LoRA config for running the LLM alone (decoding) with the adapters in `llm_params`.

    A system's targets name paths inside the whole model (`llm/layers_N/...`); the LLM run
    by itself sees `layers_N/...`, so the targets become exactly the adapted modules.
    None when there is no config or no adapter.
    """
    adapted = adapted_modules(llm_params)
    if config is None or not adapted:
        return None
    return dataclasses.replace(config, targets="|".join(re.escape(m) for m in adapted))


def left_pad(tokens: Sequence[Sequence[int]], pad: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> `(ids, mask)` `[batch, length]` int32, right-aligned (padding first),
    as decoding needs: the last position of every row is a real token."""
    length = max(len(t) for t in tokens) if length is None else length
    ids, mask = np.full((len(tokens), length), pad, np.int32), np.zeros((len(tokens), length), np.int32)
    for i, t in enumerate(tokens):
        if len(t) > length:
            raise ValueError(f"left_pad: row {i} has {len(t)} tokens > length {length}")
        if t:
            ids[i, length - len(t):], mask[i, length - len(t):] = t, 1
    return ids, mask
