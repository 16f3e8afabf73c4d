"""Settings that cannot work, refused before anything is built; each problem names its key.

Without this, `log_every=0` or `checkpoint_every=0` divide by zero after the first step, an
`eval_batch_size` that does not split over the data-parallel devices fails at the first
evaluation (hours in), `mesh.data=0` builds an empty mesh, and a short `loss_weights` list
silently drops a loss term (`zip`).
"""
import logging
import math
from numbers import Real

from ml_collections import ConfigDict

from jaxaudio.layers.partitioning import MESH_AXES

log = logging.getLogger(__name__)

# Per-part lists whose length the code fixes: (task, key, expected length, what the entries are).
PER_PART = (
    ("spatial_ast", "train.loss_weights", 4, "class, distance, azimuth, elevation"),
)


class SettingsError(ValueError):
    """Config values that cannot work; the message lists each with its `config.` key."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(config: ConfigDict, key: str, default=None):
    node = config
    for part in key.split("."):
        if not hasattr(node, "get") or part not in node:
            return default
        node = node[part]
    return node


def _mesh_problems(mesh, num_devices: int) -> tuple[list[str], int | None]:
    """Problems of `config.mesh` as `train.mesh.make_mesh` resolves it, and the data-parallel
    size (`data * fsdp`, the devices a batch is split over) when it resolves."""
    shape = dict(mesh or {})
    problems = []
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        problems.append(f"config.mesh: unknown axes {unknown}; the axes are {list(MESH_AXES)}")
    sizes = {a: shape.get(a, 1) for a in MESH_AXES}
    for axis, size in sizes.items():
        if not _is_int(size) or (size < 1 and size != -1):
            problems.append(f"config.mesh.{axis}={size!r}: a positive number of devices, or -1 for the rest")
    if problems:
        return problems, None
    if list(sizes.values()).count(-1) > 1:
        return [f"config.mesh: at most one axis may be -1, got {sizes}"], None
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if num_devices % known:
            return [f"config.mesh={sizes}: the {num_devices} devices do not divide by the fixed axes' {known}"], None
        sizes = {a: num_devices // known if s == -1 else s for a, s in sizes.items()}
    elif known > num_devices:  # a smaller explicit mesh is allowed: it takes the first devices
        return [f"config.mesh={sizes} needs {known} devices, {num_devices} are available"], None
    return [], sizes["data"] * sizes["fsdp"]


def check_settings(config: ConfigDict, num_devices: int, evaluate: bool | None = None) -> None:
    """Refuse a config that cannot train on `num_devices` devices.

    Checked: `train.steps`, `batch_size`, `eval_batch_size`, `accum_steps` > 0;
    `log_every`, `checkpoint_every`, `keep_checkpoints` >= 1 and `eval_every` >= 0 (0: never);
    `data_threads`, `data_prefetch` >= 0; `config.mesh` (known axes, sizes >= 1 or one -1,
    no more devices than there are); `batch_size` divisible by `accum_steps` and by the
    data-parallel size `mesh.data * mesh.fsdp`, and `eval_batch_size` by the latter when
    `evaluate` (default: `train.eval_every > 0`; a run that never evaluates may keep any);
    `optim` rates, steps and decay not negative, `optim.clamp` entries `(regex, lo, hi)`; the
    per-part lists of `PER_PART` and CLAP's `model.audio.depths` / `num_heads` lengths.

    Raises:
        SettingsError: every problem, one line each, naming the `config.` key.
    """
    problems = []

    def need(key: str, ok, what: str, default=None):
        value = _get(config, key, default)
        if value is not None and not ok(value):
            problems.append(f"config.{key}={value!r}: {what}")

    positive, non_negative = (lambda v: _is_int(v) and v > 0), (lambda v: _is_int(v) and v >= 0)
    need("train.steps", positive, "a positive number of steps")
    need("train.batch_size", positive, "a positive number of examples")
    need("train.eval_batch_size", positive, "a positive number of examples")
    need("train.accum_steps", positive, "a positive number of micro-batches (1: no accumulation)")
    need("train.log_every", positive, "at least 1 (the loop logs at its multiples)")
    need("train.checkpoint_every", positive, "at least 1 (checkpoints are saved at its multiples)")
    need("train.keep_checkpoints", positive, "at least 1 checkpoint kept")
    need("train.eval_every", non_negative, "0 (never) or a positive number of steps")
    for key in ("train.data_threads", "train.data_prefetch"):
        need(key, non_negative, "0 or more")
    number_ok = lambda v: isinstance(v, Real) and not isinstance(v, bool) and v >= 0  # noqa: E731
    for key in ("optim.lr", "optim.min_lr", "optim.weight_decay", "optim.max_grad_norm"):
        need(key, number_ok, "a number >= 0")
    need("optim.warmup_steps", non_negative, "0 or more steps")
    need("optim.total_steps", non_negative, "0 (as many as train.steps) or a positive number of steps")
    for entry in _get(config, "optim.clamp") or ():
        if not (isinstance(entry, (tuple, list)) and len(entry) == 3 and isinstance(entry[0], str)):
            problems.append(f"config.optim.clamp: entry {entry!r} is not (regex, lo, hi)")

    task = _get(config, "task")
    for owner, key, length, parts in PER_PART:
        value = _get(config, key)
        if task == owner and value is not None and (isinstance(value, str) or len(value) != length):
            problems.append(f"config.{key}={value!r}: {length} entries ({parts})")
    depths, heads = _get(config, "model.audio.depths"), _get(config, "model.audio.num_heads")
    if task == "clap" and depths is not None and heads is not None and len(depths) != len(heads):
        problems.append(f"config.model.audio.depths={tuple(depths)} and config.model.audio.num_heads="
                        f"{tuple(heads)}: one entry per HTSAT stage each, so the same length")

    mesh_problems, dp = _mesh_problems(_get(config, "mesh"), num_devices)
    problems += mesh_problems
    batch, accum = _get(config, "train.batch_size"), _get(config, "train.accum_steps", 1)
    if positive(batch) and positive(accum) and batch % accum:
        problems.append(f"config.train.batch_size={batch}: not divisible by config.train.accum_steps={accum}")
    if dp and positive(batch) and batch % dp:
        problems.append(f"config.train.batch_size={batch}: not divisible by the {dp} data-parallel devices "
                        "(config.mesh.data x config.mesh.fsdp)")
    eval_batch = _get(config, "train.eval_batch_size")
    if evaluate is None:
        evaluate = bool(_get(config, "train.eval_every"))
    if evaluate and dp and positive(eval_batch) and eval_batch % dp:
        problems.append(f"config.train.eval_batch_size={eval_batch}: not divisible by the {dp} data-parallel "
                        "devices (config.mesh.data x config.mesh.fsdp)")
    if problems:
        raise SettingsError(f"{len(problems)} setting{'s' if len(problems) > 1 else ''} cannot work:\n  "
                            + "\n  ".join(problems))

    if dp and accum > 1 and not batch % accum and (batch // accum) % dp:
        # Works, but the micro-batches no longer split evenly: XLA reshards every micro-step.
        log.warning("config.train.batch_size=%d / accum_steps=%d = %d rows per micro-batch do not split over the %d "
                    "data-parallel devices", batch, accum, batch // accum, dp)
    steps, total = _get(config, "train.steps"), _get(config, "optim.total_steps")
    if steps is not None and total and total < steps:
        # Works (the rate stays at its end value), but may be a `train.steps` raised without
        # `optim.total_steps` (0 would follow it).
        log.warning("config.optim.total_steps=%d < config.train.steps=%d: the learning rate reaches its end "
                    "value at step %d and stays there", total, steps, total)
