"""LoRA: low-rank updates on chosen `Dense` layers, switched on around `init`/`apply`.

Models stay LoRA-free. Inside `with lora(config, scale=...)`, every `jaxaudio.layers.Dense`
whose module path ('/'-joined, e.g. `decoder/layers_3/attn/query`) fully matches
`config.targets` computes

    y = x W + b + scale * dropout(x) A B          A [*in, r] (Kaiming-uniform), B [r, *out] (zeros)

with `lora_a`/`lora_b` ordinary parameters beside the layer's kernel. `scale` is taken at
apply time (alpha / r by default): SALMONN's activation tuning discounts it, and AudioBERT
passes one value per example (`[batch]`) to switch LoRA off where no span was found.
What trains is chosen by regex over parameter paths (`.*lora_[ab]`) in `config.optim`.
"""
import contextlib
import dataclasses
import math
import re
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.convert.engine import flatten, unflatten
from jaxaudio.layers.dense import Dense
from jaxaudio.layers.partitioning import param
from jaxaudio.layers.scan import restack, scanned_stacks, unrolled_name, unstack

TRAINABLE = r".*/lora_[ab]"  # the optimizer regex that trains only the adapters


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`targets`: regex over module paths (fullmatch), e.g. `.*/attn/(query|value)`."""
    targets: str
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"LoRA targets {self.targets!r} is not a valid regex: {e}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _kaiming_uniform_a_sqrt5(fan_in: int):
    """PyTorch's `kaiming_uniform_(a=sqrt(5))` (PEFT's init of A): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _low_rank(module: Dense, x: jax.Array, config: LoraConfig, scale: Any, deterministic: bool) -> jax.Array:
    n_in = module.contract
    in_shape = tuple(x.shape[-n_in:])
    a = module.param("lora_a", param(_kaiming_uniform_a_sqrt5(int(np.prod(in_shape))),
                                     tuple(module.axes[:n_in]) + ("lora_rank",)),
                     in_shape + (config.rank,), module.param_dtype)
    b = module.param("lora_b", param(nn.initializers.zeros, ("lora_rank",) + tuple(module.axes[n_in:])),
                     (config.rank,) + tuple(module.features), module.param_dtype)
    if config.dropout > 0.0 and not deterministic:
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - config.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - config.dropout), 0.0).astype(x.dtype)
    x = x.astype(module.dtype)
    h = jnp.tensordot(x, a.astype(module.dtype), axes=(tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))))
    delta = jnp.tensordot(h, b.astype(module.dtype), axes=1)
    scale = jnp.asarray(scale, module.dtype)
    if scale.ndim:  # one scale per example: [batch] -> [batch, 1, ..., 1]
        scale = scale.reshape(scale.shape + (1,) * (delta.ndim - scale.ndim))
    return delta * scale


def _targeted(pattern: re.Pattern, path: tuple[str, ...]) -> bool:
    """Whether the targets match the module, under its own path or, inside a scanned stack
    (`llm/layers/attn/query`), under layer 0's unrolled one (`llm/layers_0/attn/query`)."""
    name = "/".join(path)
    return bool(pattern.fullmatch(name) or pattern.fullmatch(unrolled_name(name)))


@contextlib.contextmanager
def lora(config: LoraConfig | None, *, scale: Any = None, deterministic: bool = True) -> Iterator[None]:
    """Apply LoRA to the matching `Dense` layers of any `init`/`apply` run inside the block.

    `scale`: a float, a scalar array or one value per example `[batch]`; None = alpha / r.
    `deterministic=False` applies the adapter dropout (needs a `dropout` rng).
    With `config=None` the block runs the plain model.
    """
    if config is None:
        yield
        return
    pattern = re.compile(config.targets)
    value = config.scale if scale is None else scale

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, Dense) and _targeted(pattern, module.path):
            out = out + _low_rank(module, args[0], config, value, deterministic).astype(out.dtype)
        return out

    with nn.intercept_methods(interceptor):
        yield


def adapted_modules(params: Any) -> list[str]:
    """'/'-joined paths (inside `params`) of the modules that hold `lora_a`/`lora_b`."""
    return sorted({k.rsplit("/", 1)[0] for k in flatten(params) if k.endswith("/lora_a")})


def merge(params: Any, scale: float) -> Any:
    """Fold every adapter into its kernel (`W + scale * A B`) and drop `lora_a`/`lora_b`,
    for serving without the LoRA branch. `scale` is usually `config.scale`."""
    flat = dict(flatten(params))
    stacks = scanned_stacks(flat)
    flat = unstack(flat)  # one kernel per layer; the stacks are rebuilt below
    for module in adapted_modules(unflatten(flat)):
        a, b = flat.pop(f"{module}/lora_a"), flat.pop(f"{module}/lora_b")
        kernel = flat[f"{module}/kernel"]
        rank = a.shape[-1]
        delta = (jnp.reshape(a, (-1, rank)).astype(jnp.float32) @ jnp.reshape(b, (rank, -1)).astype(jnp.float32))
        flat[f"{module}/kernel"] = (kernel.astype(jnp.float32) + scale * delta.reshape(kernel.shape)).astype(kernel.dtype)
    return unflatten(restack(flat, stacks))


def split(params: Any) -> tuple[Any, Any]:
    """`(base, adapters)`: the same tree split into parameters without and with `lora_`."""
    flat = flatten(params)
    adapters = {k: v for k, v in flat.items() if k.rsplit("/", 1)[-1].startswith("lora_")}
    base = {k: v for k, v in flat.items() if k not in adapters}
    return unflatten(base), unflatten(adapters)


def combine(base: Any, adapters: Any) -> Any:
    """Inverse of `split`."""
    return unflatten({**flatten(base), **flatten(adapters)})
