"""Compile a config's steps ahead of time for a target and say whether they fit, before paying
for the chips (as maxtext's `train_compile.py`).

    python -m launch.aot --config=configs/bat.py:3 --topology=v5e:2x2 --config.mesh.fsdp=4
    python -m launch.aot --config=configs/salmonn_7b.py:1 --topology=v5e:2x4 --batch=8 --steps=train,eval
    python -m launch.aot --config=configs/spatial_ast_tiny.py --json=aot.json   # the local devices

`--topology` names a TPU slice (`v5e:2x2`, `v5p:2x2x1`, `v6e:2x2`, `v4:2x2x1`, ...): the
program is compiled here, without the chips, by `libtpu` (`pip install libtpu`, the version
`jax[tpu]` pins for the installed jax). Without it, the local devices are the target. The
mesh is the config's (`config.mesh`, e.g. `--config.mesh.fsdp=4`), the batch
`train.batch_size` (`--batch` overrides it; the eval step uses `train.eval_batch_size`).

Per device, for each step (`train`: the trainer's own train step, state donated; `eval`: the
task's eval step, which for BAT and SALMONN holds the beam-search decoding loop): parameter
and optimizer-state bytes (from the shardings), XLA's argument, output and temporary bytes,
the peak (arguments + outputs not aliased to them + temporaries + code) against the chip's
memory, whether it fits, compile seconds and XLA's FLOPs per step (per device).
"""
import json
import os
import sys
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU metadata server here: libtpu must not wait for one
# Deviceless compiles hold no chip: two of them (or a test beside a run) may share the host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch.common import check_config, parse_flags, setup_jax, user_errors  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU slice by name (v5e:2x2, v5p:2x2x1, v6e:2x2, ...), "
                                "compiled for without the chips; default: the local devices.")
_BATCH = flags.DEFINE_integer("batch", None, "Global train batch (default: config.train.batch_size).")
_STEPS = flags.DEFINE_list("steps", ["train"], "Which steps: train, eval.")
_JSON = flags.DEFINE_string("json", None, "Also write the report here.")
_MEMORY = flags.DEFINE_float("chip_memory_gib", None, "The chip's memory (default: known per chip kind).")
flags.mark_flags_as_required(["config"])

GIB = 1024 ** 3
# Memory per chip (HBM) by `device_kind`, for devices that do not report their own.
CHIP_MEMORY_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32,
                   "TPU v6e": 32}


class AotError(ValueError):
    pass


def target_devices(topology: str | None) -> list:
    import jax
    if not topology:
        return list(jax.devices())
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 — libtpu missing, or a name it does not know
        first = " ".join(str(e).split())[:300]
        raise AotError(f"--topology={topology}: cannot describe that TPU slice ({first}); it needs libtpu "
                       "(pip install libtpu, the version jax[tpu] pins) and a name such as v5e:2x2 or v5p:2x2x1") \
            from None


def chip_memory(device, override: float | None) -> int | None:
    if override:
        return int(override * GIB)
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 — topology devices and CPUs report nothing
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    gib = CHIP_MEMORY_GIB.get(device.device_kind)
    return None if gib is None else gib * GIB


def per_device_bytes(tree) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs with shardings): the largest shard."""
    import jax
    import numpy as np
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def _abstract_batch(batch, sharding):
    import jax
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in batch.items()}


def compile_report(compiled, seconds: float, memory: int | None, extra: dict) -> dict:
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else (cost or {})
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
            + m.generated_code_size_in_bytes)
    out = dict(extra, argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
               alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes, peak_bytes=peak,
               chip_bytes=memory, fits=None if memory is None else bool(peak <= memory),
               headroom=None if memory is None else 1.0 - peak / memory, compile_s=seconds,
               flops=float(cost.get("flops", 0.0)))
    return out


def compile_steps(config, devices: list, steps: list[str], batch: int | None = None,
                  memory_gib: float | None = None) -> dict:
    """Compile `steps` of `config` for `devices` (real or a topology's); the report as a dict."""
    import flax.linen as nn
    import jax

    from jaxaudio.layers.partitioning import DEFAULT_RULES
    from jaxaudio.layers.platform import for_platform
    from jaxaudio.tasks import get_task
    from jaxaudio.train.loop import make_train_step
    from jaxaudio.train.mesh import batch_sharding, make_mesh
    from jaxaudio.train.optim import make_optimizer, resolve_total_steps, storage_dtypes, trainable_mask
    from jaxaudio.train.settings import check_settings
    from jaxaudio.train.state import abstract_train_state

    unknown = sorted(set(steps) - {"train", "eval"})
    if unknown:
        raise AotError(f"--steps: unknown {unknown}; choose from train, eval")
    with config.unlocked():
        if batch:
            config.train.batch_size = batch
    check_settings(config, len(devices))
    resolve_total_steps(config)
    mesh = make_mesh(config.mesh.to_dict(), devices)
    task = get_task(config.task)(config)  # no data: the batches are abstract
    rng = jax.random.PRNGKey(config.seed)
    params = nn.unbox(jax.eval_shape(task.init_variables, rng))["params"]
    tx, _ = make_optimizer(config.optim, params, task.layer_scale)
    state, shardings = abstract_train_state(task.init_variables, tx, rng, mesh, DEFAULT_RULES,
                                            storage_dtypes(config.optim, params))
    data_sh = batch_sharding(mesh)
    memory = chip_memory(devices[0], memory_gib)
    report = {"config": config.get("task"), "devices": len(devices), "device_kind": devices[0].device_kind,
              "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
              "param_bytes": per_device_bytes(state.params), "opt_state_bytes": per_device_bytes(state.opt_state),
              "params": int(sum(x.size for x in jax.tree.leaves(state.params))), "steps": {}}
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES), for_platform(devices[0].platform):
        if "train" in steps:
            tcfg = config.train
            fn = make_train_step(task, tx, tcfg.accum_steps, tcfg.nan_guard, trainable_mask(config.optim, params))
            b = _abstract_batch(task.batch_spec(tcfg.batch_size, train=True), data_sh)
            t0 = time.perf_counter()
            compiled = jax.jit(fn, in_shardings=(shardings, data_sh), out_shardings=(shardings, None),
                               donate_argnums=0).lower(state, b).compile()
            report["steps"]["train"] = compile_report(compiled, time.perf_counter() - t0, memory,
                                                      {"batch": tcfg.batch_size})
        if "eval" in steps:
            size = config.train.eval_batch_size
            b = _abstract_batch(task.batch_spec(size, train=False), data_sh)
            t0 = time.perf_counter()
            compiled = jax.jit(task.eval_step, in_shardings=(shardings.params, shardings.extra, data_sh)).lower(
                state.params, state.extra, b).compile()
            report["steps"]["eval"] = compile_report(compiled, time.perf_counter() - t0, memory, {"batch": size})
    return report


def format_report(r: dict) -> str:
    def gib(n):
        if n is None:
            return "-"
        return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2 ** 20:.1f} MiB"
    lines = [f"{r['config']} on {r['devices']} x {r['device_kind']}, mesh {r['mesh']}, {r['params'] / 1e6:.1f}M "
             f"parameters", f"  per device: parameters {gib(r['param_bytes'])}, optimizer state "
             f"{gib(r['opt_state_bytes'])}"]
    for name, s in r["steps"].items():
        verdict = "?" if s["fits"] is None else ("fits" if s["fits"] else "DOES NOT FIT")
        room = "" if s["headroom"] is None else f", headroom {100 * s['headroom']:.0f}%"
        lines.append(f"  {name} (batch {s['batch']}): peak {gib(s['peak_bytes'])} of {gib(s['chip_bytes'])} "
                     f"-> {verdict}{room}; arguments {gib(s['argument_bytes'])}, temporaries {gib(s['temp_bytes'])}, "
                     f"outputs {gib(s['output_bytes'])} ({gib(s['alias_bytes'])} aliased); compile "
                     f"{s['compile_s']:.1f} s; {s['flops']:.3e} FLOPs/step/device")
    return "\n".join(lines)


def main(argv):
    del argv
    if _TOPOLOGY.value:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiled here for the slice; nothing runs on it
    setup_jax()
    import jax
    # The persistent cache holds executables for this host's client; a deviceless TPU
    # compile can neither load nor reuse them.
    jax.config.update("jax_enable_compilation_cache", not _TOPOLOGY.value)
    config = check_config(_CONFIG.value)
    try:
        report = compile_steps(config, target_devices(_TOPOLOGY.value), _STEPS.value, _BATCH.value, _MEMORY.value)
    except (AotError, *user_errors()) as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(2)
    report["topology"] = _TOPOLOGY.value or "local"
    print(format_report(report))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
