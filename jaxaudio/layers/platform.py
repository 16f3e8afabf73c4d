"""The platform a program is traced for: where it will run, not always where Python runs.

Ahead-of-time compilation for a TPU slice (`launch/aot.py`) traces on a CPU host; the
layers that choose an implementation by platform (the CPU attention kernel, CPU query
blocks) must choose for the target, or the TPU program would call a CPU-only kernel.
"""
import contextlib
import contextvars

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxaudio_target_platform", default=None)


def target_platform() -> str:
    """"cpu", "gpu", "tpu": `for_platform`'s, else `jax.default_backend()`."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def for_platform(name: str):
    """Trace for `name` ("cpu" | "gpu" | "tpu") inside the block."""
    token = _TARGET.set(name)
    try:
        yield
    finally:
        _TARGET.reset(token)
