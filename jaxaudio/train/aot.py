"""Ahead-of-time compilation of a config's steps for a target (a TPU slice, deviceless, or the
local devices) and what it tells before launching: per-device memory against the chip,
whether it fits, compile time, FLOPs. `launch/aot.py` is the command line.
"""
import os
import time
from typing import Any

GIB = 1024 ** 3
# Memory per chip (HBM) by `device_kind`, for devices that do not report their own.
CHIP_MEMORY_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32,
                   "TPU v6e": 32}


class AotError(ValueError):
    pass


def _dims(text: str) -> list[int]:
    dims = [int(x) for x in text.split("x")]
    return dims + [1] * (3 - len(dims))


def target_devices(topology: str | None, chips_per_host: str | None = None) -> list:
    """The local devices, or the compile-only devices of the TPU slice `topology`
    ("v5e:2x2"). `chips_per_host` ("2x4") gives the slice's host shape; by default libtpu's,
    and for a slice smaller than that (one chip, a v5e 2x4 host) the slice's own."""
    import jax
    if not topology:
        return list(jax.devices())
    from jax.experimental import topologies
    # Before libtpu loads: no TPU metadata server to wait for, and deviceless compiles hold
    # no chip, so two may share the host.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    def describe(**kw):
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kw).devices)
    try:
        if chips_per_host:
            return describe(chips_per_host_bounds=_dims(chips_per_host))
        try:
            return describe()
        except Exception as e:  # noqa: BLE001
            if "not divisible" not in str(e) or ":" not in topology:
                raise
            return describe(chips_per_host_bounds=_dims(topology.split(":", 1)[1]))
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


def _count(params) -> int:
    """The number of parameters (an int8-stored kernel counts its own, not its scales)."""
    import jax

    from jaxaudio.layers.quant import QTensor
    return int(sum(x.size for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QTensor))))


def _abstract_batch(batch, sharding):
    import jax
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in batch.items()}


def _compile(lowered) -> tuple[Any, float]:
    """`(compiled, seconds)`; a program over the chip's memory is a `DoesNotFit`, not a crash."""
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 — XlaRuntimeError / JaxRuntimeError by version
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise DoesNotFit(" ".join(str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].split())[:400],
                         time.perf_counter() - t0) from None
    return compiled, time.perf_counter() - t0


class DoesNotFit(Exception):
    """XLA refused to compile: the program needs more memory than the chip has."""

    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.seconds = seconds


def compile_report(compiled, seconds: float, memory: int | None, extra: dict) -> dict:
    from jaxaudio.train.flops import compiled_flops
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
            + m.generated_code_size_in_bytes)
    out = dict(extra, argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
               alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes, peak_bytes=peak,
               chip_bytes=memory, fits=None if memory is None else bool(peak <= memory),
               headroom=None if memory is None else 1.0 - peak / memory, compile_s=seconds,
               flops=compiled_flops(compiled) or 0.0)
    return out


def compile_steps(config, devices: list, steps: list[str], batch: int | None = None,
                  memory_gib: float | None = None) -> dict:
    """Compile `steps` of `config` for `devices` (real or a topology's); the report as a dict."""
    import flax.linen as nn
    import jax

    from jaxaudio.layers.dense import abstract_init
    from jaxaudio.layers.partitioning import DEFAULT_RULES
    from jaxaudio.layers.platform import for_platform
    from jaxaudio.tasks import get_task
    from jaxaudio.train.flops import matmul_flops
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
    abstract, dense_kernels = abstract_init(task.init_variables, rng)
    params = nn.unbox(abstract)["params"]
    tx, _ = make_optimizer(config.optim, params, task.layer_scale)
    state, shardings = abstract_train_state(task.init_variables, tx, rng, mesh, DEFAULT_RULES,
                                            storage_dtypes(config.optim, params, dense_kernels))
    data_sh = batch_sharding(mesh)
    memory = chip_memory(devices[0], memory_gib)
    report = {"config": config.get("task"), "devices": len(devices), "device_kind": devices[0].device_kind,
              "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
              "param_bytes": per_device_bytes(state.params), "opt_state_bytes": per_device_bytes(state.opt_state),
              "params": _count(state.params), "steps": {}}
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES), for_platform(devices[0].platform):
        compiled_steps = {}
        if "train" in steps:
            tcfg = config.train
            fn = make_train_step(task, tx, tcfg.accum_steps, tcfg.nan_guard, trainable_mask(config.optim, params))
            b = _abstract_batch(task.batch_spec(tcfg.batch_size, train=True), data_sh)
            jitted = jax.jit(fn, in_shardings=(shardings, data_sh), out_shardings=(shardings, None), donate_argnums=0)
            compiled_steps["train"] = (jitted, (state, b), tcfg.batch_size)
        if "eval" in steps:
            size = config.train.eval_batch_size
            b = _abstract_batch(task.batch_spec(size, train=False), data_sh)
            jitted = jax.jit(task.eval_step, in_shardings=(shardings.params, shardings.extra, data_sh))
            compiled_steps["eval"] = (jitted, (state.params, state.extra, b), size)
        for name, (jitted, args, size) in compiled_steps.items():
            t0 = time.perf_counter()
            traced = jitted.trace(*args)  # one trace: lowered, and its jaxpr counted
            lowered = traced.lower()
            lower_s = time.perf_counter() - t0
            matmul, exact = matmul_flops(traced.jaxpr)
            extra = {"batch": size, "matmul_flops": matmul / len(devices), "matmul_flops_exact": exact,
                     "lower_s": lower_s}
            try:
                compiled, seconds = _compile(lowered)
            except DoesNotFit as e:
                report["steps"][name] = dict(extra, fits=False, error=str(e), compile_s=lower_s + e.seconds,
                                             chip_bytes=memory)
                continue
            report["steps"][name] = compile_report(compiled, lower_s + seconds, memory, extra)
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
        if s.get("error"):
            lines.append(f"  {name} (batch {s['batch']}): DOES NOT FIT — XLA: {s['error']} "
                         f"(chip {gib(s['chip_bytes'])}; {s['compile_s']:.1f} s)")
            continue
        verdict = "?" if s["fits"] is None else ("fits" if s["fits"] else "DOES NOT FIT")
        room = "" if s["headroom"] is None else f", headroom {100 * s['headroom']:.0f}%"
        approx = "" if s["matmul_flops_exact"] else " (a decoding loop counted once)"
        lines.append(f"  {name} (batch {s['batch']}): peak {gib(s['peak_bytes'])} of {gib(s['chip_bytes'])} "
                     f"-> {verdict}{room}; arguments {gib(s['argument_bytes'])}, temporaries {gib(s['temp_bytes'])}, "
                     f"outputs {gib(s['output_bytes'])} ({gib(s['alias_bytes'])} aliased); compile "
                     f"{s['compile_s']:.1f} s ({s['lower_s']:.1f} s tracing and lowering); matmul FLOPs/step/device {s['matmul_flops']:.3e}{approx} "
                     f"(XLA's count, loop bodies once: {s['flops']:.3e})")
    return "\n".join(lines)
