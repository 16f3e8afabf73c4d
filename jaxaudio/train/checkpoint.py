"""Orbax checkpoints of the train state that restore on any mesh and any number of processes.

Only the state is saved: the data position is the step itself (`train.batches`: the global
batch of step s is a function of the seed and s), so nothing in a checkpoint depends on the
layout that wrote it. Arrays are restored into the shardings of the target (the current
mesh) or, without a target, onto one local device.

A checkpoint that cannot be restored (a truncated or garbled file, a missing item, an empty
step folder) is never deleted: the trainer moves it to `<workdir>/checkpoints.damaged/`,
warns once naming it, and restores the one before. A checkpoint whose shapes do not fit the
model is not damaged: that is an error naming the differing keys, unless it is the same
state in the other layer layout (`jaxaudio.layers.scan`), which is converted as it loads.
"""
import logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxaudio.layers.quant import as_output_major, dequantize_tree, output_major_shape
from jaxaudio.layers.scan import counterpart, relayout

log = logging.getLogger(__name__)


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split()).split(" See full TensorStore details")[0]
    return text[:240] or type(error).__name__


def _quiet_failed_reads() -> None:
    """After a failed restore, tensorstore's pending reads finish on a closed event loop and
    print a page of "Event loop is closed" tracebacks each: drop those (and only those)."""
    if getattr(sys.unraisablehook, "_jaxaudio", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        e = unraisable.exc_value
        if (isinstance(e, RuntimeError) and str(e) == "Event loop is closed") or \
                "_read_array_index" in repr(unraisable.object):
            return
        previous(unraisable)
    hook._jaxaudio = True
    sys.unraisablehook = hook


def _warn_skipped(step: int, directory: str, error: Exception) -> None:
    log.warning("checkpoint step %d in %s cannot be restored (%s); trying the one before", step, directory,
                _reason(error))


class CheckpointMismatch(ValueError):
    """The checkpoint is readable but holds another model's shapes."""


def _manager(directory: str, every: int = 1, keep: int | None = None, create: bool = False) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep, create=create,
                                                        enable_async_checkpointing=False),
        item_handlers={"state": ocp.StandardCheckpointHandler()})


def _key(entry) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey: orbax's metadata has dicts only
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat(tree) -> dict[str, Any]:
    """`{"params/a/w": leaf}` of a state or of its checkpoint metadata (same keys for both)."""
    return {"/".join(_key(e) for e in path): v for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def _shapes(tree) -> dict[str, tuple]:
    return {k: tuple(getattr(v, "shape", ())) for k, v in _flat(tree).items()}


def _restore(manager: ocp.CheckpointManager, step: int, target: Any | None) -> Any:
    """Restore step `step`'s state into `target` (a tree of arrays or ShapeDtypeStructs with
    shardings), or onto one local device when `target` is None."""
    meta = manager.item_metadata(step)
    meta = meta["state"] if meta is not None and "state" in meta else None
    if meta is None:
        raise FileNotFoundError(f"step {step} has no readable 'state' item")
    if target is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    else:
        want, have = _shapes(target), _shapes(meta)
        if want != have:
            if _relayout_shapes(meta, want) == want:  # the other layer layout (`jaxaudio.layers.scan`)
                return _restore_relayout(manager, step, meta, target)
            plan = _output_major_plan(have, want)
            if plan:
                return _restore_output_major(manager, step, meta, target, plan)
            keys = sorted({k for k in set(want) | set(have) if want.get(k) != have.get(k)})
            lines = [f"{k}: checkpoint {have.get(k, 'absent')}, model {want.get(k, 'absent')}" for k in keys]
            hint = ""
            if any(k.endswith(("/q", "/scale")) for k in keys):
                hint = ("\n(int8 kernels on one side only: pass the run's --config.optim.frozen_storage, "
                        "recorded in its config.json)")
            raise CheckpointMismatch(f"checkpoint step {step} does not fit the model:\n  " + "\n  ".join(lines[:40])
                                     + hint)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]


def _relayout_shapes(meta, want: dict[str, tuple]) -> dict[str, tuple]:
    """The checkpoint's shapes after `relayout` into the keys of `want` (nothing is read)."""
    abstract = {k: jax.ShapeDtypeStruct(m.shape, m.dtype) for k, m in _flat(meta).items()}
    return {k: tuple(v.shape) for k, v in jax.eval_shape(lambda t: relayout(t, want), abstract).items()}


def _restore_relayout(manager: ocp.CheckpointManager, step: int, meta, target) -> Any:
    """A state saved with the other layer layout (scanned `layers/` or unrolled `layers_N/`):
    read it with each array sharded like its counterpart in `target` (a layer of a stack,
    or a stack of layers), relayout, and place it in `target`'s shardings. The state is held
    twice while this runs, once per run that changes layout."""
    shardings = {k: v.sharding for k, v in _flat(target).items()}

    def saved_sharding(path, m):
        key = "/".join(_key(e) for e in path)
        if key in shardings:
            return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=shardings[key])
        other, is_layer = counterpart(key)
        sh = shardings[other]
        if is_layer:  # one layer of a stack the model scans: the stack's spec without its axis
            spec = tuple(sh.spec) + (None,) * (len(m.shape) + 1 - len(sh.spec))
            sh = NamedSharding(sh.mesh, PartitionSpec(*spec[1:]))
        else:  # a stack the model unrolls: a layer's spec behind an unsharded layer axis
            sh = NamedSharding(sh.mesh, PartitionSpec(None, *sh.spec))
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sh)

    saved = jax.tree_util.tree_map_with_path(saved_sharding, meta)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(saved)))["state"]
    flat = relayout(_flat(state), shardings)
    leaves = [jax.device_put(flat[k], sh) for k, sh in shardings.items()]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)


def _output_major_plan(have: dict[str, tuple], want: dict[str, tuple]) -> dict[str, str]:
    """Runs saved before frozen per-head projections were kept output-major (`layers.quant`)
    hold an int8 `q` in kernel order (`.../kernel/q [*lead, in, *out]`) or a float kernel
    (`.../kernel`) where the model keeps `.../kernel/q [*lead, out, in]` (and scales of 1):
    `{new q key: the saved key it comes from}` when those are the only differences, else
    empty."""
    plan, used = {}, set()
    for k in sorted(set(want) - {k for k in want if have.get(k) == want[k]}):
        base = k[:-len("/q")] if k.endswith("/q") else None
        if base is None:
            if k.endswith("/scale") and k[:-len("/scale")] in have and k[:-len("/scale")] not in want:
                continue  # the scales of 1 of a float kernel that was kept whole
            return {}
        old = k if k in have else base if base in have and base not in want else None
        n_lead = len(want[k]) - 2
        if (old is None or n_lead < 0 or len(have[old]) <= len(want[k])
                or output_major_shape(have[old], n_lead) != want[k]):
            return {}
        plan[k] = old
        used.add(old)
    stale = {k for k in have if k not in want or have[k] != want[k]} - used
    return plan if plan and not stale else {}


def _restore_output_major(manager: ocp.CheckpointManager, step: int, meta, target, plan: dict[str, str]) -> Any:
    """Restore a state by `_output_major_plan`: each saved kernel read sharded like its
    output-major `q` in `target` (the output spec on the first output axis), turned
    output-major in `q`'s dtype and sharding; a float kernel's scales are ones."""
    flat_target = _flat(target)
    shardings = {k: v.sharding for k, v in flat_target.items()}
    source = {old: new for new, old in plan.items()}

    def saved_sharding(path, m):
        key = "/".join(_key(e) for e in path)
        if key not in source:
            return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=shardings[key])
        sh, n_lead = shardings[source[key]], len(flat_target[source[key]].shape) - 2
        spec = tuple(sh.spec) + (None,) * (n_lead + 2 - len(sh.spec))
        rest = (None,) * (len(m.shape) - n_lead - 2)
        sh = NamedSharding(sh.mesh, PartitionSpec(*spec[:n_lead], spec[-1], spec[-2], *rest))
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sh)

    saved = jax.tree_util.tree_map_with_path(saved_sharding, meta)
    state = _flat(manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(saved)))["state"])

    def convert(x, n_lead, dtype):
        return as_output_major(x, n_lead).astype(dtype)
    for new, old in plan.items():
        want = flat_target[new]
        state[new] = jax.jit(convert, static_argnums=(1, 2), out_shardings=shardings[new])(
            state[old], len(want.shape) - 2, want.dtype)
        scale = new[:-len("/q")] + "/scale"
        if scale not in state:  # a float kernel kept whole: scales of 1
            w = flat_target[scale]
            state[scale] = jax.jit(lambda: jnp.ones(w.shape, w.dtype), out_shardings=shardings[scale])()
    leaves = [jax.device_put(state[k], sh) for k, sh in shardings.items()]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)


class Checkpointer:
    """Saves the state every `every` steps under `workdir/checkpoints`, keeping `keep`."""

    def __init__(self, workdir: str, every: int, keep: int = 3):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.manager = _manager(self.directory, every, keep, create=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)

    def restore_latest(self, target: Any, move_damaged: bool = True) -> tuple[int | None, Any]:
        """`(step, state)` of the newest checkpoint that restores into `target`'s shapes and
        shardings; `(None, target)` when there is none. Damaged ones are moved aside (or,
        without `move_damaged`, skipped with a warning)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, _restore(self.manager, step, target)
            except CheckpointMismatch as e:
                raise CheckpointMismatch(f"{self.directory}: {e}") from None
            except Exception as e:  # noqa: BLE001 — orbax/tensorstore raise many types for a bad file
                _quiet_failed_reads()
                if move_damaged:
                    self._move_aside(step, e)
                else:
                    _warn_skipped(step, self.directory, e)
        return None, target

    def _move_aside(self, step: int, error: Exception) -> None:
        reason = _reason(error)
        damaged = os.path.join(self.workdir, "checkpoints.damaged")
        dest = os.path.join(damaged, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(damaged, exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxaudio:damaged:{step}")
        log.warning("checkpoint step %d in %s cannot be restored (%s): moved to %s; trying the one before",
                    step, self.directory, reason, dest)
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_run_variables(workdir: str) -> tuple[int, dict[str, Any]]:
    """`(step, {"params": ..., <extra collections>...})` as numpy, from the newest readable
    checkpoint of the run in `workdir`, whatever mesh or process count saved it, int8-stored
    kernels dequantised to float32. A damaged checkpoint is skipped with a warning (and left
    where it is: this only reads)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise ValueError(f"{workdir}: not a training run's workdir (no checkpoints folder)")
    manager = _manager(directory)
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise ValueError(f"{workdir}: the run has saved no checkpoint yet")
        for step in steps:
            try:
                state = _restore(manager, step, None)
            except Exception as e:  # noqa: BLE001
                _quiet_failed_reads()
                _warn_skipped(step, directory, e)
                continue
            variables = {"params": state["params"], **state["extra"]}
            # int8-stored kernels come back as {"q", "scale"}: readers get the float kernel.
            return step, dequantize_tree(jax.tree.map(np.asarray, variables))
        raise ValueError(f"{workdir}: none of its checkpoints {steps} can be restored")
    finally:
        manager.close()
