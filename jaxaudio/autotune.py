"""Pick XLA compile options by timing: `compile_fastest`.

XLA's CPU backend (jaxlib 0.10) hands float matmuls to YNNPACK; its older Eigen path is still
reachable through the `xla_cpu_experimental_ynn_fusion_type` option. Neither wins everywhere:
on a 2-core EPYC (AVX2) Eigen runs the BAT Q-Former's `[4120, 768] x [768, 768]` context
projections 15-45% faster and the whole Q-Former forward 5-13% faster, while YNNPACK is 3-8%
faster on the LLaMA and Whisper-base forwards (on LLaMA's `[1024, 768] x [768, 2048]` MLP
GEMM by a third). Which one a program wants depends on its GEMM shapes and on the CPU, so,
like XLA's GPU GEMM autotuner, `compile_fastest` compiles the program under each candidate,
runs each on the real arguments and keeps the faster. On GPU and TPU there is one
candidate and nothing is timed.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax

# name -> XLA compile options, per platform; the first entry is XLA's default.
CANDIDATES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {"ynnpack": {}, "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""}},
}


@dataclasses.dataclass
class Tuned:
    """The fastest `compiled` program, its candidate `name`, the median seconds per call of
    every candidate that compiled (`seconds`; empty when only one did, nothing was timed),
    why the others were skipped (`skipped`: name -> error) and the seconds spent compiling
    all candidates (`compile_seconds`, the timing runs not included)."""
    compiled: Any
    name: str
    seconds: dict[str, float]
    skipped: dict[str, str]
    compile_seconds: float


def candidates(platform: str | None = None) -> dict[str, dict[str, Any]]:
    """The candidate option sets for `platform` (default: the default backend's)."""
    return CANDIDATES.get(platform or jax.default_backend(), {"default": {}})


def select(name: str, platform: str | None = None) -> dict[str, dict[str, Any]]:
    """`name` "auto": every candidate of `platform`; a candidate's name: that one alone.
    Anything else is a ValueError that lists the names."""
    options = candidates(platform)
    if name == "auto":
        return options
    if name not in options:
        raise ValueError(f"expected auto or one of {', '.join(options)} on {platform or jax.default_backend()}, "
                         f"got {name!r}")
    return {name: options[name]}


def compile_fastest(lowered: jax.stages.Lowered, *args, rounds: int = 3,
                    options: dict[str, dict[str, Any]] | None = None) -> Tuned:
    """Compile `lowered` (from `jax.jit(f).lower(*args)`) under each option set in `options`
    (default: `candidates()`), call each compiled program once to warm it, then `rounds`
    times on `args` taking turns, and return the one with the lowest median time.

    An option set this jaxlib does not know is skipped (`Tuned.skipped`). The arguments are
    reused across calls, so a program that donates any of them is refused.
    """
    donated = [i for i, a in enumerate(jax.tree.leaves(lowered.args_info)) if a.donated]
    if donated:
        raise ValueError(f"compile_fastest: the program donates argument leaves {donated}; timing it would "
                         "consume them. Lower a copy of the function without donate_argnums.")
    if rounds < 1:
        raise ValueError(f"compile_fastest: rounds must be at least 1, got {rounds}")
    options = candidates() if options is None else options
    compiled, skipped = {}, {}
    t0 = time.perf_counter()
    for name, opts in options.items():
        try:
            compiled[name] = lowered.compile(compiler_options=opts or None)
        except Exception as e:  # an option this jaxlib lacks: "No such compile option"
            skipped[name] = f"{type(e).__name__}: {e}"
    compile_seconds = time.perf_counter() - t0
    if not compiled:
        raise ValueError("compile_fastest: no candidate compiled: " +
                         "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    if len(compiled) == 1:
        (name, program), = compiled.items()
        return Tuned(program, name, {}, skipped, compile_seconds)
    times = {name: [] for name in compiled}
    for program in compiled.values():
        jax.block_until_ready(program(*args))
    names = list(compiled)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[name](*args))
            times[name].append(time.perf_counter() - t0)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    best = min(seconds, key=seconds.get)
    return Tuned(compiled[best], best, seconds, skipped, compile_seconds)
