"""Test-session setup: 8 fake CPU devices (for the sharding tests) and a compile cache.

XLA_FLAGS must be set before jax is imported, so it happens here, first.
"""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from launch.torch_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()

jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "jaxaudio_test_jit"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
