"""Layers under `nn.scan`: one compiled block for a whole stack, and the parameter layout
that goes with it.

An unrolled stack names its blocks `layers_0 ... layers_{n-1}`, each with its own
parameters; XLA compiles every block separately, so a 7B LLM's 32 layers cost 32 times
one layer's compile. A scanned stack is one module `layers` whose parameters carry a
leading axis `[n, ...]` (logical name `layers`, never sharded) and whose block is
compiled once (`jax.lax.scan`). Values are the same: `restack` / `unstack` convert one
layout into the other, and every loader (converted checkpoints, training runs, restored
train states, PEFT adapters) goes through `relayout`, so checkpoints written in either
layout load into a model in either layout.

LoRA under a scan: adapters sit inside the block, so every layer of the stack is adapted
alike; targets are matched against the unrolled name of layer 0 (`llm/layers_0/attn/query`)
as well as the scanned one (`llm/layers/attn/query`), so the usual `layers_\\d+` regexes
keep working.
"""
import functools
import re
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxaudio.layers.remat import POLICIES, remat_policy

STACK = "layers"  # the scanned module's name; its blocks' unrolled names are `layers_{i}`
_UNROLLED = re.compile(rf"(^|/){STACK}_(\d+)(?=/|$)")
_SCANNED = re.compile(rf"(^|/){STACK}(?=/|$)")


def scanned_block(cls: type[nn.Module], length: int, policy: str | bool, n_broadcast: int,
                  static_argnums: tuple[int, ...] = (), field: str = "remat") -> type[nn.Module]:
    """`nn.scan` over `length` copies of `cls` (remat'ed with `policy` first).

    The block's `__call__(x, *args)` must return `(x, None)` (the carry and no per-layer
    output); the `n_broadcast` other arguments are the same for every layer (Python values
    such as `train` among them, counted in `static_argnums` as for `remat_block`). Parameters (and
    any per-layer `cache` variables) get a leading layer axis; each layer draws its own init
    and dropout keys. Give the instance the name `STACK`. A decoder should not keep its KV
    cache as per-layer variables here: the scan would read one cache stack and write another;
    carry one stack through the scan instead (`MultiHeadAttention(stacked_cache=...)`, as
    `models.llama` does).
    """
    return _scanned(cls, length, remat_policy(policy, field), n_broadcast, tuple(static_argnums))


@functools.lru_cache(maxsize=None)
def _scanned(cls, length, policy, n_broadcast, static_argnums):
    body = cls
    if policy != "none":
        # Inside a scan XLA cannot merge the recomputation into the forward (the loop body
        # is one computation), so CSE prevention is not needed and only costs speed.
        body = nn.remat(cls, policy=POLICIES[policy], prevent_cse=False, static_argnums=static_argnums)
    return nn.scan(body, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,) * n_broadcast, length=length,
                   metadata_params={nn.PARTITION_NAME: STACK})


def unrolled_name(path: str) -> str:
    """A scanned path under its layer-0 name: `llm/layers/attn/query` -> `llm/layers_0/attn/query`."""
    return _SCANNED.sub(rf"\1{STACK}_0", path, count=1)


def _split(key: str) -> tuple[str, int | None, str] | None:
    """`llm/layers_3/attn/q` -> ("llm/layers", 3, "attn/q"); `llm/layers/attn/q` -> ("llm/layers",
    None, "attn/q"); None outside a stack."""
    m = _UNROLLED.search(key)
    if m is not None:
        return key[:m.start()] + m.group(1) + STACK, int(m.group(2)), key[m.end() + 1:]
    m = _SCANNED.search(key)
    if m is not None:
        return key[:m.end()], None, key[m.end() + 1:]
    return None


def counterpart(key: str) -> tuple[str, bool] | None:
    """`(the key in the other layout, whether `key` is one layer)`: `x/layers_3/r` -> (its
    stack `x/layers/r`, True); `x/layers/r` -> (its first layer `x/layers_0/r`, False);
    None outside a stack."""
    s = _split(key)
    if s is None:
        return None
    return (_join(s[0], s[2]), True) if s[1] is not None else (_join(f"{s[0]}_0", s[2]), False)


def scanned_stacks(keys) -> set[str]:
    """The scanned stacks (`llm/layers`) among flat keys."""
    return {s[0] for k in keys if (s := _split(k)) is not None and s[1] is None}


def _join(stack: str, rest: str) -> str:
    return f"{stack}/{rest}" if rest else stack


def unstack(flat: Mapping[str, Any], keep: set[str] = frozenset()) -> dict[str, Any]:
    """Every scanned stack of `flat` (except those in `keep`) as unrolled `layers_{i}` keys,
    the layout PyTorch files, PEFT adapters and older checkpoints use."""
    out = {}
    for key, value in flat.items():
        s = _split(key)
        if s is None or s[1] is not None or s[0] in keep:
            out[key] = value
            continue
        stack, _, rest = s
        for i in range(np.shape(value)[0]):
            out[_join(f"{stack}_{i}", rest)] = value[i]
    return out


class LayoutError(ValueError):
    """Unrolled layers that cannot make a stack (some layers lack a variable)."""


def restack(flat: Mapping[str, Any], stacks: set[str], strict: bool = False) -> dict[str, Any]:
    """The unrolled keys of each stack in `stacks` (`llm/layers_{i}/rest`) stacked into
    `llm/layers/rest` `[n, ...]` where layers 0..n-1 are all there; anything else as it is
    (or, `strict`, a `LayoutError` naming the variables only some layers have)."""
    groups: dict[tuple[str, str], dict[int, str]] = {}
    for key in flat:
        s = _split(key)
        if s is not None and s[1] is not None and s[0] in stacks:
            groups.setdefault((s[0], s[2]), {})[s[1]] = key
    depth = {}
    for (stack, _), members in groups.items():
        depth[stack] = max(depth.get(stack, 0), max(members) + 1)
    out = dict(flat)
    gaps = []
    for (stack, rest), members in groups.items():
        if sorted(members) != list(range(depth[stack])):
            gaps.append(f"{_join(stack, rest)}: layers {sorted(members)} of {depth[stack]}")
            continue
        values = [out.pop(members[i]) for i in range(len(members))]
        out[_join(stack, rest)] = (np.stack(values) if all(isinstance(v, np.ndarray) for v in values)
                                   else jnp.stack(values))
    if strict and gaps:
        raise LayoutError("only some layers have " + "; ".join(sorted(gaps)[:8]))
    return out


def relayout(flat: Mapping[str, Any], want_keys) -> dict[str, Any]:
    """`flat` (`{'a/b': array}`, either layout) in the layout of `want_keys`: stacks scanned
    there are stacked, the others unrolled. Keys neither layout explains stay as they are,
    for the caller's own missing / unexpected accounting."""
    wanted = scanned_stacks(want_keys)
    return restack(unstack(flat, keep=wanted), wanted)
