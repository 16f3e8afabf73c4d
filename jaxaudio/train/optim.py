"""Optimizer: AdamW, warmup + cosine, layer-wise lr decay, clipping, frozen parameters,
parameters kept inside a range (`optim.clamp`: CLAP's logit scales).

What trains is chosen by regex over '/'-joined parameter paths (`optim.trainable`,
`optim.frozen`); frozen parameters go through `optax.set_to_zero()` inside
`optax.multi_transform`, so they get no optimizer state.
"""
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from jaxaudio.convert.engine import flatten, unflatten
from jaxaudio.layers.quant import StoredKernel, kernel_reduce_axes, output_major


def path_labels(params: Any, fn: Callable[[str], Any]) -> Any:
    """A tree like `params` whose leaves are `fn('/'-joined path)`."""
    return unflatten({k: fn(k) for k in flatten(params)})


def resolve_total_steps(config: ConfigDict) -> None:
    """`optim.total_steps` 0 (the configs' default): the schedule spans `train.steps`, as the
    run starts (so `--config.train.steps=40` also shortens the schedule). Sets it in place."""
    if not config.optim.get("total_steps"):
        with config.unlocked():
            config.optim.total_steps = int(config.train.steps)


def make_schedule(cfg: ConfigDict) -> optax.Schedule:
    """Linear warmup from `warmup_start_lr` (default 0) to `lr`, then a half-cycle cosine to
    `min_lr` at `total_steps`.

    `schedule="lavis"` is LAVIS' `LinearWarmupCosineLRScheduler` (SALMONN's): the cosine is
    a function of the absolute step over all `total_steps`, so it starts slightly below
    `lr` when the warmup ends; the default cosine spans the steps after the warmup.
    """
    if not cfg.get("total_steps"):
        raise ValueError("config.optim.total_steps is 0: resolve_total_steps(config) sets it to train.steps")
    warmup, start = int(cfg.warmup_steps), float(cfg.get("warmup_start_lr", 0.0))
    kind = cfg.get("schedule", "warmup_cosine")
    if kind == "lavis":
        lr, min_lr, total = float(cfg.lr), float(cfg.min_lr), max(int(cfg.total_steps), 1)

        def schedule(step):
            step = jnp.asarray(step, jnp.float32)
            warm = jnp.minimum(lr, start + (lr - start) * step / max(warmup, 1))
            cosine = (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * step / total)) + min_lr
            return jnp.where(step < warmup, warm, cosine)
        return schedule
    if kind != "warmup_cosine":
        raise ValueError(f"config.optim.schedule={kind!r}: choose 'warmup_cosine' or 'lavis'")
    return optax.warmup_cosine_decay_schedule(
        init_value=start, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(int(cfg.total_steps), warmup + 1), end_value=cfg.min_lr)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by a fixed per-parameter factor (layer-wise lr decay)."""
    masked = optax.transforms.MaskedNode  # frozen parameters inside `multi_transform`

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, s: u if isinstance(u, masked) else u * jnp.asarray(s, u.dtype),
                            updates, scales, is_leaf=lambda x: isinstance(x, masked)), state
    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def clamp_params(bounds: Any) -> optax.GradientTransformation:
    """Turn each update into one that leaves its parameter inside `(lo, hi)` (a tree like the
    params; None leaves are untouched): the functional form of PyTorch's in-place
    `param.clamp_(lo, hi)` after `optimizer.step()` (LAION-CLAP's logit scales)."""
    masked = optax.transforms.MaskedNode

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("clamp_params needs the parameters")

        def one(u, p, b):
            if isinstance(u, masked) or b is None:
                return u
            return jnp.clip(p + u, b[0], b[1]) - p
        return jax.tree.map(one, updates, params, bounds, is_leaf=lambda x: isinstance(x, masked) or x is None), state
    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def clamp_bounds(cfg: ConfigDict, params: Any) -> Any | None:
    """`optim.clamp` (`((regex, lo, hi), ...)` over '/'-joined paths) as a tree of bounds, or
    None when nothing is clamped. A regex that matches no parameter is an error."""
    rules = [(re.compile(r), float(lo), float(hi)) for r, lo, hi in (cfg.get("clamp") or ())]
    if not rules:
        return None
    paths = list(flatten(params))
    for pattern, lo, hi in rules:
        if lo > hi:
            raise ValueError(f"config.optim.clamp: {pattern.pattern!r} has lo={lo} > hi={hi}")
        if not any(pattern.fullmatch(p) for p in paths):
            raise ValueError(f"config.optim.clamp: {pattern.pattern!r} matches no parameter; "
                             f"paths look like {sorted(paths)[:5]}")
    return path_labels(params, lambda p: next(((lo, hi) for r, lo, hi in rules if r.fullmatch(p)), None))


def trainable_mask(cfg: ConfigDict, params: Any) -> Any:
    """A tree like `params`: True where `optim.trainable` matches the path and `optim.frozen`
    does not."""
    trainable = re.compile(cfg.trainable)
    frozen = re.compile(cfg.frozen) if cfg.get("frozen") else None
    mask = path_labels(params, lambda p: bool(trainable.fullmatch(p)) and not (frozen and frozen.fullmatch(p)))
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"config.optim.trainable={cfg.trainable!r} matches no parameter; "
                         f"paths look like {sorted(flatten(params))[:5]}")
    return mask


STORAGE_DTYPES = ("float32", "bfloat16", "float16", "int8")


def _storage_spec(cfg: ConfigDict, parts: set[str]) -> dict[str, str]:
    """`optim.frozen_storage` as `{part: dtype name}`, checked against the model's parts."""
    spec = cfg.get("frozen_storage") or {}
    if isinstance(spec, str):  # "llm=bfloat16,encoder=bfloat16", as a command-line flag gives it
        pairs = [p.partition("=") for p in spec.split(",") if p.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise ValueError(f"config.optim.frozen_storage={spec!r}: write part=dtype[,part=dtype...]")
        spec = {k.strip(): v.strip() for k, _, v in pairs}
    spec = dict(spec)
    for part, name in spec.items():
        if part not in parts:
            raise ValueError(f"config.optim.frozen_storage: {part!r} is not a part of the model; parts: {sorted(parts)}")
        if name not in STORAGE_DTYPES:
            raise ValueError(f"config.optim.frozen_storage[{part!r}]={name!r}: choose one of {STORAGE_DTYPES}")
    return spec


def storage_dtypes(cfg: ConfigDict, params: Any, dense_kernels: Mapping[str, tuple[int, int]] | None = None) -> Any:
    """A tree like `params`: how each parameter is stored — a dtype name, "" for its own, or
    `quant.StoredKernel(dtype, reduce_axes, ndim)` (a `QTensor`).

    `optim.frozen_storage` (`{part: dtype}`, e.g. `{"llm": "bfloat16"}`, or the string
    "llm=bfloat16,encoder=bfloat16") stores the frozen
    parameters under `part/` in `dtype`: a frozen 7B LLM takes half the memory in bf16, while
    what trains (LoRA, the projector) keeps fp32 master weights and fp32 Adam moments. The
    layers compute in the model's `dtype` either way (they cast their weights).

    `int8` (a quarter of fp32): the part's frozen `Dense` kernels become int8 with one fp32
    scale per output channel (`layers.quant`), its other frozen parameters (embeddings,
    norms, biases, convolutions) bf16. In any storage dtype a frozen per-head projection
    (`[embed, heads, head_dim]`) is kept output-major (`layers.quant`: TPUs want the heads
    outermost). Which leaves are Dense kernels, and their input and output axes, comes from
    `dense_kernels` (`layers.dense.abstract_init`); without it they keep their layout."""
    spec = _storage_spec(cfg, {k.split("/")[0] for k in flatten(params)})
    if "int8" in spec.values() and dense_kernels is None:
        raise ValueError("config.optim.frozen_storage: int8 needs the model's Dense kernels "
                         "(storage_dtypes(..., dense_kernels=layers.dense.abstract_init(init, rng)[1]))")
    mask, shapes = flatten(trainable_mask(cfg, params)), flatten(params)

    def label(path: str):
        name = "" if mask[path] else spec.get(path.split("/")[0], "")
        if not name or dense_kernels is None or path not in dense_kernels:
            return "bfloat16" if name == "int8" else name
        ndim = len(shapes[path].shape)
        axes = kernel_reduce_axes(ndim, *dense_kernels[path])
        if name == "int8" or output_major(ndim, axes):
            return StoredKernel(name, axes, ndim)
        return name
    return path_labels(params, label)


def make_optimizer(cfg: ConfigDict, params: Any, layer_scale: Callable[[str], float] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Build the optimizer for `params` (a tree, or abstract shapes) from `config.optim`.

    `layer_scale(path) -> float` gives the lr multiplier of each parameter (1 when None).
    """
    schedule = make_schedule(cfg)
    no_decay = re.compile(cfg.no_decay)
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(cfg, params))
    decay_mask = path_labels(params, lambda p: not no_decay.fullmatch(p))
    scales = path_labels(params, layer_scale or (lambda _: 1.0))
    adamw = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm else optax.identity(),
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        scale_by_tree(scales),
        optax.scale_by_learning_rate(schedule),
    )
    bounds = clamp_bounds(cfg, params)
    if bounds is not None:
        adamw = optax.chain(adamw, clamp_params(bounds))
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels), schedule


def layer_decay_scale(num_layers: int, decay: float, layer_id: Callable[[str], int]) -> Callable[[str], float]:
    """BEiT-style layer-wise lr decay: parameter in layer i gets `decay ** (num_layers - i)`."""
    return lambda path: decay ** (num_layers - layer_id(path))
