"""Logical axis names and the rules that map them onto mesh axes.

Every parameter carries logical names (`embed`, `mlp`, `heads`, ...) and every activation
at a block boundary gets a logical constraint (`act_batch`, `act_length`, ...). One rule
table (`DEFAULT_RULES`) maps names to the mesh axes `data`, `fsdp` and `tensor`; the
trainer turns the annotated abstract state into `NamedSharding`s with it. Parameters and
activations use separate names so that FSDP can shard weights over `fsdp` while the
activations' embedding axis stays whole.
"""
from typing import Sequence

import flax.linen as nn
import jax

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("classes", None),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", None),
    ("conv_h", None),
    ("conv_w", None),
    ("tokens", None),
    ("vocab", None),  # vocabularies (30522, 32001...) rarely divide by the tensor axis
    ("lora_rank", None),
    ("layers", None),  # the layer axis of a scanned stack (jaxaudio.layers.scan)
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
)


def param(init: nn.initializers.Initializer, axes: Sequence[str | None]):
    """An initializer whose parameter carries the logical axis names `axes`."""
    return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical names (a no-op outside a mesh)."""
    return nn.with_logical_constraint(x, tuple(axes))
