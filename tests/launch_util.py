"""What the launcher end-to-end tests share: running `python -m launch.X` and overriding a
config the way `--config.a.b=v` flags do."""
import functools
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository root on one CPU device."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def override(config, overrides: dict):
    """Sets dotted keys ("train.steps") on an ml_collections config in place; returns it."""
    for key, value in overrides.items():
        *parents, name = key.split(".")
        functools.reduce(getattr, parents, config)[name] = value
    return config
