"""The one generic train/eval loop (every model plugs in through a `Task`).

Sharding is `jax.jit` with explicit in/out shardings over the mesh from `config.mesh`;
the train state is donated; gradients may be accumulated over micro-batches and are
guarded against NaN/Inf (a bad step leaves the state unchanged and is counted). Only the
train state is checkpointed: the data position is the step (`train.batches`), so a run
restarted with the same `workdir` continues exactly where it stopped, on any mesh and any
number of processes. The first start stores the resolved config in the workdir; a restart
that would change the results is refused (`train.run_config`). SIGTERM / SIGINT finish the
step, save it and stop (`train.preemption`).
"""
import contextlib
import functools
import logging
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from jaxaudio.convert.engine import flatten, unflatten
from jaxaudio.convert.io import load_converted
from jaxaudio.layers.dense import abstract_init
from jaxaudio.layers.partitioning import DEFAULT_RULES
from jaxaudio.layers.quant import QTensor, store, stored_as
from jaxaudio.layers.scan import relayout
from jaxaudio.tasks import get_task
from jaxaudio.tasks.base import Task, eval_batches
from jaxaudio.train.batches import train_batches
from jaxaudio.train.checkpoint import Checkpointer, restore_run_variables
from jaxaudio.train.mesh import batch_sharding, make_mesh
from jaxaudio.train.optim import make_optimizer, resolve_total_steps, storage_dtypes, trainable_mask
from jaxaudio.train.preemption import Preempted, PreemptionGuard
from jaxaudio.train.run_config import check_run_config
from jaxaudio.train.settings import check_settings
from jaxaudio.train.state import TrainState, create_sharded_state, split_variables
from jaxaudio.train.writer import MetricWriter

log = logging.getLogger(__name__)


def _split_micro(x: jax.Array, accum: int) -> jax.Array:
    """`[global, ...]` -> `[accum, global/accum, ...]`; micro-batch j takes rows j, j+accum, ...
    so every micro-batch stays spread over all data-parallel devices."""
    return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _with_floats(params: Any, floats: list[jax.Array]) -> Any:
    """`params` with its inexact leaves (in flattening order) replaced by `floats`."""
    leaves, treedef = jax.tree.flatten(params)
    it = iter(floats)
    return treedef.unflatten([next(it) if _is_float(x) else x for x in leaves])


def make_train_step(task: Task, tx: optax.GradientTransformation, accum_steps: int = 1, nan_guard: bool = True,
                    trainable: Any = None):
    """`train_step(state, batch) -> (state, metrics)`, not yet jitted.

    `trainable` (a tree of bools like the params, `optim.trainable_mask`) stops gradients
    at frozen parameters, so XLA never computes their weight gradients (a frozen LLM's
    would cost as much as training it), and passes the frozen parameters through untouched:
    no zero update and no NaN-guard select is applied to them (XLA does not always fold
    those away, e.g. for bf16-stored ones), so nothing parameter-sized is made for them
    (`tests/train/test_frozen_program.py` checks the compiled program).

    Gradients are taken with respect to the floating-point leaves only: int8-stored frozen
    kernels (`quant.QTensor.q`) cannot be differentiated; the optimizer sees zeros for them
    that nothing reads (a float `QTensor.q` gets a zero cotangent from its matmul).
    """
    def loss_fn(floats, params, extra, batch, rng):
        params = _with_floats(params, floats)
        if trainable is not None:
            params = jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), trainable, params)
        return task.loss_fn(params, extra, batch, rng)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        micro = jax.tree.map(lambda x: _split_micro(x, accum_steps), batch)
        floats = [x for x in jax.tree.leaves(state.params) if _is_float(x)]

        def one(carry, inputs):
            grads, extra = carry
            mb, i = inputs
            (loss, (metrics, extra)), g = grad_fn(floats, state.params, extra, mb, jax.random.fold_in(rng, i))
            grads = jax.tree.map(lambda a, b: a + b / accum_steps, grads, g)
            return (grads, extra), dict(metrics, loss=loss)

        zeros = jax.tree.map(jnp.zeros_like, floats)
        (grads, extra), metrics = jax.lax.scan(one, (zeros, state.extra), (micro, jnp.arange(accum_steps)))
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        grads = _with_floats(jax.tree.map(jnp.zeros_like, state.params), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if trainable is not None:  # frozen: the very input buffers, so nothing below copies them
            params = jax.tree.map(lambda t, n, o: n if t else o, trainable, params, state.params)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
        if nan_guard:
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            new = jax.tree.map(lambda n, o: n if n is o else jnp.where(ok, n, o), new,
                               state.replace(step=state.step + 1))
            metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
        return new, metrics

    return train_step


def is_run_dir(path: str) -> bool:
    """Whether `path` is a training run's workdir (it has a `checkpoints` folder)."""
    return os.path.isdir(os.path.join(path, "checkpoints"))


def load_run_variables(workdir: str) -> dict[str, Any]:
    """`{"params": ..., <extra collections>...}` (numpy) of the newest readable checkpoint of
    the training run in `workdir`, saved on any mesh by any number of processes; the optimizer
    state and step are not returned."""
    return restore_run_variables(workdir)[1]


def _as_stored(value: np.ndarray, current: Any) -> Any:
    """A loaded value in the storage of the state's `current` leaf: its dtype (e.g. a
    bf16-stored conversion into an fp32 master), or a `QTensor` kept like it (int8, or a
    float output-major)."""
    if isinstance(current, QTensor):
        return store(value, stored_as(current))
    return value.astype(current.dtype)


def _global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


class Trainer:
    """Holds the mesh, the compiled steps, the data iterator and the checkpointer of a run."""

    def __init__(self, config: ConfigDict, workdir: str, allow_config_change: bool = False):
        self.config, self.workdir, self.allow_config_change = config, workdir, allow_config_change
        check_settings(config, jax.device_count())  # settings that cannot work, before anything is built
        resolve_total_steps(config)
        self.task: Task = get_task(config.task)(config)
        self.mesh = make_mesh(config.mesh.to_dict())
        self.batch_sharding = batch_sharding(self.mesh)
        tcfg = config.train
        if tcfg.batch_size % (tcfg.accum_steps * jax.process_count()):
            raise ValueError(f"config.train.batch_size={tcfg.batch_size} must be divisible by "
                             f"accum_steps={tcfg.accum_steps} x processes={jax.process_count()}")
        if jax.process_index() == 0:  # one writer; the others wait for the files
            self.task.prepare_data()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxaudio:prepare_data")
        abstract, dense_kernels = abstract_init(self.task.init_variables, jax.random.PRNGKey(0))
        abstract_params = nn.unbox(abstract)["params"]
        self.tx, self.schedule = make_optimizer(config.optim, abstract_params, self.task.layer_scale)
        self.trainable = trainable_mask(config.optim, abstract_params)
        # The out_shardings place the state; init needs no activation constraints.
        self.state, self.shardings = create_sharded_state(
            self.task.init_variables, self.tx, jax.random.PRNGKey(config.seed), self.mesh, DEFAULT_RULES,
            storage_dtypes(config.optim, abstract_params, dense_kernels))
        if config.init.get("checkpoint"):
            self.state = self._load_initial(config.init.checkpoint)
        else:
            for part, path in self.task.pretrained_parts().items():
                self.state = self._load_initial(path, part, what=f"config.init.{part}")
        self.task.bind_variables({"params": self.state.params, **self.state.extra})
        step = make_train_step(self.task, self.tx, tcfg.accum_steps, tcfg.nan_guard, self.trainable)
        self.train_step = jax.jit(step, in_shardings=(self.shardings, self.batch_sharding),
                                  out_shardings=(self.shardings, None), donate_argnums=0)
        self.eval_step = jax.jit(self.task.eval_step,
                                 in_shardings=(self.shardings.params, self.shardings.extra, self.batch_sharding))
        self.data_iter = None  # made by `train`, at the step it starts from
        self.checkpointer = Checkpointer(workdir, tcfg.checkpoint_every, tcfg.keep_checkpoints)
        self.history: list[dict[str, float]] = []  # the logged train metrics, with their step

    def sharding_context(self) -> contextlib.ExitStack:
        """The mesh and logical-axis rules under which steps are traced, so the models'
        activation constraints (`layers.constrain`) take effect."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(DEFAULT_RULES))
        return stack

    def _load_initial(self, path: str, part: str | None = None, what: str = "config.init.checkpoint") -> TrainState:
        """Start from a converted checkpoint, or from the latest checkpoint of another
        training run's workdir (its parameters and extra collections; a curriculum's next
        stage). Every variable must be in it, except those declared fresh (`fresh` in a
        converted checkpoint's config.json, or the regex `config.init.fresh`: e.g. the heads
        when starting from a pretraining checkpoint), which keep their initialisation.

        With `part`, the checkpoint is one sub-module's (`Task.pretrained_parts`): it fills
        the variables under `<collection>/<part>/`, except LoRA adapters, which stay fresh;
        the rest of the model keeps its initialisation."""
        if is_run_dir(path):
            variables, saved_config = load_run_variables(path), {}
        else:
            variables, saved_config = load_converted(path)
        # Variables the checkpoint may lack: its own `fresh` and the config's `init.fresh`
        # (e.g. a new head on a pretrained encoder), matched as "<collection>/<path in the part>".
        fresh = re.compile("|".join(f"(?:{r})" for r in (saved_config.get("fresh"), self.config.init.get("fresh"))
                                    if r) or r"(?!)")
        params, extra = split_variables(variables)
        current = {"params": self.state.params, **self.state.extra}
        loaded = {"params": params, **extra}
        merged, problems = {}, []
        for coll, tree in current.items():
            if part is not None and part not in tree:
                merged[coll] = tree
                continue
            out = flatten(tree, is_leaf=lambda x: isinstance(x, QTensor))  # a quantized kernel: one leaf
            # Either layer layout (scanned `layers/` or unrolled `layers_N/`) into this model's.
            in_part = [k if part is None else k[len(part) + 1:] for k in out
                       if part is None or k.startswith(part + "/")]
            have = relayout(flatten(loaded.get(coll, {})), in_part)
            for k, v in list(out.items()):
                if part is not None and (not k.startswith(part + "/") or k.rsplit("/", 1)[-1] in ("lora_a", "lora_b")):
                    continue  # outside the part, or an adapter: keeps its initialisation
                key = k if part is None else k[len(part) + 1:]
                got = have.get(key)
                if got is None:
                    if not fresh.fullmatch(f"{coll}/{key}"):
                        problems.append(f"missing {coll}/{key} {tuple(v.shape)}")
                elif tuple(got.shape) != tuple(v.shape):
                    problems.append(f"{coll}/{key}: checkpoint {tuple(got.shape)}, model {tuple(v.shape)}")
                else:
                    out[k] = _as_stored(np.asarray(got), v)
            merged[coll] = unflatten(out)
        if problems:
            where = "the model" if part is None else f"config.model.{part}"
            raise ValueError(f"{what}={path} does not fit {where}:\n  " + "\n  ".join(problems[:40]))
        params, extra = merged.pop("params"), merged
        placed = jax.device_put((params, extra), (self.shardings.params, self.shardings.extra))
        return self.state.replace(params=placed[0], extra=placed[1])

    def batches(self, start_step: int):
        """This process's batches of steps `start_step + 1`, ... (`train.batches`: the data
        position is the step, whatever the number of processes)."""
        tcfg = self.config.train
        ds = self.task.train_source()
        if len(ds) == 0:
            raise ValueError(f"the training set of task {self.config.task!r} is empty (check config.data)")
        return train_batches(ds, seed=self.config.seed, batch_size=tcfg.batch_size, start_step=start_step,
                             process=jax.process_index(), processes=jax.process_count(), augment=self.task.augment,
                             threads=tcfg.data_threads, prefetch=tcfg.data_prefetch)

    def restore_or_init(self, move_damaged: bool = True) -> int:
        """Continue from the newest restorable checkpoint in `workdir`, if any (on this mesh,
        whatever mesh saved it; a damaged one is moved aside, or only skipped without
        `move_damaged`); returns the step."""
        latest, state = self.checkpointer.restore_latest(self.state, move_damaged)
        if latest is not None:
            self.state = state
            self.task.bind_variables({"params": self.state.params, **self.state.extra})
            log.info("restored step %d from %s", latest, self.workdir)
        return int(self.state.step)

    def evaluate(self) -> dict[str, float]:
        with self.sharding_context():
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        outputs: dict[str, list[np.ndarray]] = {}
        bs = self.config.train.eval_batch_size
        for batch in eval_batches(self.task.eval_source(), bs):
            valid = batch.pop("valid")
            arrays = {k: jax.make_array_from_callback(v.shape, self.batch_sharding, functools.partial(
                lambda v, idx: v[idx], v)) for k, v in batch.items()}
            out = self.eval_step(self.state.params, self.state.extra, arrays)
            out = multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1 else out
            for k, v in jax.device_get(out).items():
                outputs.setdefault(k, []).append(np.asarray(v)[valid])
        return self.task.eval_metrics({k: np.concatenate(v) for k, v in outputs.items()})

    def _step(self, step: int, writer: MetricWriter, pending: list) -> dict[str, float] | None:
        """One train step plus whatever falls due at it (logging, eval, checkpoint)."""
        tcfg = self.config.train
        batch = _global_batch(next(self.data_iter), self.batch_sharding)
        self.state, metrics = self.train_step(self.state, batch)
        pending.append(metrics)
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            host = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
            host["lr"] = float(self.schedule(step - 1))
            pending.clear()
            writer.scalars(step, host)
            self.history.append(dict(host, step=step))
            writer.progress(step, host)
        # Saved before the evaluation, so a failing evaluation loses no training.
        self.checkpointer.save(step, self.state, force=step == tcfg.steps)
        eval_metrics = None
        if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.steps):
            eval_metrics = self._evaluate()
            writer.scalars(step, eval_metrics, prefix="eval")
            writer.log(f"step {step} eval: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
        return eval_metrics

    def train(self) -> dict[str, float]:
        """Train to `config.train.steps` (resuming if possible), evaluating on the way. On
        SIGTERM / SIGINT: finishes the step, saves it and raises `Preempted`."""
        tcfg = self.config.train
        check_run_config(self.config, self.workdir, self.allow_config_change)
        start = self.restore_or_init()
        self.data_iter = self.batches(start)
        writer = MetricWriter(self.workdir, tcfg.steps, start)
        eval_metrics: dict[str, float] = {}
        pending: list[dict[str, Any]] = []
        try:
            with self.sharding_context(), PreemptionGuard() as guard:
                for step in range(start + 1, tcfg.steps + 1):
                    eval_metrics = self._step(step, writer, pending) or eval_metrics
                    signum = guard.requested()
                    if signum and step < tcfg.steps:
                        self.checkpointer.save(step, self.state, force=True)
                        raise Preempted(step, signum, os.path.abspath(self.workdir))
        finally:
            writer.close()
            self.checkpointer.close()
        return eval_metrics


def train_and_evaluate(config: ConfigDict, workdir: str, allow_config_change: bool = False) -> dict[str, float]:
    os.makedirs(workdir, exist_ok=True)
    return Trainer(config, workdir, allow_config_change).train()
