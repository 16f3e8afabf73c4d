"""Activation rematerialisation per block: a stack's `remat` field names what each block's
forward keeps for the backward pass; the rest is recomputed there.

  "none"           no remat: every intermediate activation is kept
  "full"           only the block's inputs (`nothing_saveable`): the whole block runs again
  "dots"           every matmul output, attention logits included (`checkpoint_dots`):
                   norms, activations, softmax are recomputed
  "dots_no_batch"  matmuls without batch dimensions (`dots_with_no_batch_dims_saveable`):
                   the projections and MLP matmuls are kept, attention (`q k^T`, `p v`)
                   is recomputed

A bool is taken as older configs wrote it: True = "full", False = "none". Parameter names
and values do not change (the blocks are named explicitly), so checkpoints load either way.
"""
import functools

import flax.linen as nn
import jax

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(value: str | bool, field: str = "remat") -> str:
    """The policy name of a `remat` field's value; `field` (e.g. "Llama.remat") names it in errors."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in POLICIES:
        raise ValueError(f"{field}={value!r}: choose one of {tuple(POLICIES)} (or a bool: True = 'full')")
    return value


def remat_block(cls: type[nn.Module], policy: str | bool, static_argnums: tuple[int, ...] = (),
                field: str = "remat") -> type[nn.Module]:
    """`cls` itself for "none", else `nn.remat(cls)` with the named policy.

    `static_argnums` count `self` as 0 (flax's convention): the Python-valued arguments
    (`train`, `deterministic`). Instances must be given a `name` (or be set in `setup`),
    or flax names them after the wrapper class (`CheckpointPreNormBlock_0`).
    """
    return _wrapped(cls, remat_policy(policy, field), tuple(static_argnums))


@functools.lru_cache(maxsize=None)
def _wrapped(cls, name, static_argnums):
    # One wrapper class per (block, policy): every call of a compact model would make a new one.
    if name == "none":
        return cls
    # prevent_cse: the blocks are unrolled (no scan), where XLA could otherwise merge the
    # recomputation with the forward and keep the activations after all.
    return nn.remat(cls, policy=POLICIES[name], prevent_cse=True, static_argnums=static_argnums)
