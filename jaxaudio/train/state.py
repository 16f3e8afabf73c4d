"""The train state and its sharded creation."""
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxaudio.layers.quant import QTensor, StoredKernel, store, stored_q_spec
from jaxaudio.train.mesh import logical_shardings


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: the step, parameters, optimizer state, the
    non-trained collections (BatchNorm statistics) and the base PRNG key (each step's key
    is `fold_in(rng, step)`, so a restored run draws the same randomness)."""
    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any
    rng: jax.Array


def split_variables(variables: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    variables = dict(variables)
    return variables.pop("params"), variables


def _store(params: Any, storage: Any | None) -> Any:
    """Each parameter in its storage (`optim.storage_dtypes`): cast to a dtype name ("" keeps
    it) or a `QTensor` (`StoredKernel`: int8, or a float output-major); `storage=None`: unchanged."""
    if storage is None:
        return params

    def one(x, how):
        if isinstance(how, StoredKernel):
            return store(x, how)
        return x.astype(how) if how else x
    return jax.tree.map(one, params, storage)


def _stored_shardings(shardings: Any, storage: Any | None) -> Any:
    """The parameters' shardings for their storage: a quantized kernel's `q` keeps the
    kernel's (`quant.stored_q_spec` for an output-major `q`), its `scale` the same without
    the reduced (size-1) axes' mesh axes."""
    if storage is None:
        return shardings

    def one(sh: NamedSharding, how):
        if not isinstance(how, StoredKernel):
            return sh
        spec = tuple(sh.spec) + (None,) * (how.ndim - len(sh.spec))
        scale = PartitionSpec(*(None if i in how.reduce_axes else a for i, a in enumerate(spec)))
        q = PartitionSpec(*stored_q_spec(spec, how.ndim, how.reduce_axes))
        return QTensor(q=NamedSharding(sh.mesh, q), scale=NamedSharding(sh.mesh, scale))
    return jax.tree.map(one, shardings, storage)


def abstract_train_state(init_variables, tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh,
                         rules, storage: Any | None = None) -> tuple[TrainState, TrainState]:
    """`(abstract state, shardings)`: the train state's shapes and dtypes (ShapeDtypeStructs
    carrying their shardings) and its shardings, with nothing allocated — what
    `create_sharded_state` fills and what ahead-of-time compilation (`launch/aot.py`) lowers with.

    `init_variables(rng)` returns variables whose leaves carry logical axis names; optimizer
    moments take the sharding of their parameter. `storage` (`optim.storage_dtypes`) gives
    how each parameter is kept (a dtype, or a `QTensor` whose `q` and `scale` are
    sharded like the kernel).
    """
    abstract = jax.eval_shape(init_variables, rng)
    var_sh = logical_shardings(abstract, mesh, rules)
    params_sh, extra_sh = split_variables(var_sh)
    params_sh = _stored_shardings(params_sh, storage)
    abstract_params = jax.eval_shape(functools.partial(_store, storage=storage), nn.unbox(split_variables(abstract)[0]))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    repl = NamedSharding(mesh, PartitionSpec())
    # Moments are params-shaped; frozen parameters appear as empty `MaskedNode`s.
    masked = optax.transforms.MaskedNode
    opt_sh = optax.tree_map_params(tx, lambda p, s: p if isinstance(p, masked) else s, abstract_opt, params_sh,
                                   transform_non_params=lambda _: repl,
                                   is_leaf=lambda x: isinstance(x, (NamedSharding, masked)))
    shardings = TrainState(step=repl, params=params_sh, opt_state=opt_sh, extra=extra_sh, rng=repl)
    extra = split_variables(nn.unbox(abstract))[1]
    params = abstract_params
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=abstract_opt, extra=extra,
                        rng=jax.ShapeDtypeStruct(rng.shape, rng.dtype))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return state, shardings


def create_sharded_state(init_variables, tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh,
                         rules, storage: Any | None = None) -> tuple[TrainState, TrainState]:
    """Initialise the train state directly into its shardings (`abstract_train_state`'s),
    parameters in their storage dtypes. Returns `(state, shardings)`."""
    _, shardings = abstract_train_state(init_variables, tx, rng, mesh, rules, storage)

    def init(rng):
        params, extra = split_variables(nn.unbox(init_variables(rng)))
        params = _store(params, storage)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          extra=extra, rng=rng)

    return jax.jit(init, out_shardings=shardings)(rng), shardings
