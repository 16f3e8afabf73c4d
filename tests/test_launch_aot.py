"""launch/aot.py: a config's steps compiled for a TPU slice on this CPU machine (libtpu,
deviceless), per-device memory from the shardings and from XLA, and the launcher's report."""
import json

import jax
import pytest

from launch_util import run_module
from train.fixtures import make_clips, tiny_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("clips"))
    make_clips(root)
    return root


@pytest.fixture()
def no_cache():
    """Deviceless TPU executables cannot go through the host's persistent compile cache."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", before)


def test_compiles_for_a_tpu_slice(data_root, no_cache, monkeypatch):
    pytest.importorskip("libtpu", reason="requirements-test.txt installs libtpu only where jax 0.10.x is (Python < 3.12)")
    from jaxaudio.train.aot import compile_steps, target_devices
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = target_devices("v5e:2x2")
    assert len(devices) == 4 and devices[0].platform == "tpu"
    assert len(target_devices("v5e:1x1")) == 1 and len(target_devices("v5e:2x4")) == 8  # smaller than a host
    reports = {}
    for name, mesh in (("data", dict(data=4, fsdp=1)), ("fsdp", dict(data=1, fsdp=4))):
        c = tiny_config(data_root, steps=2)
        c.mesh.update(mesh)
        steps = ["train", "eval"] if name == "data" else ["train"]
        reports[name] = compile_steps(c, devices, steps, batch=8)
    r = reports["data"]
    assert r["device_kind"] == "TPU v5 lite" and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert r["param_bytes"] == 4 * r["params"]  # replicated fp32
    for step in ("train", "eval"):
        s = r["steps"][step]
        assert s["chip_bytes"] == 16 * 2 ** 30 and s["fits"] and s["flops"] > 0 and s["compile_s"] > 0
        assert s["peak_bytes"] >= s["argument_bytes"] > 0
    # fsdp splits the parameters (and their Adam moments) over the 4 chips.
    assert reports["fsdp"]["param_bytes"] < r["param_bytes"] / 2
    assert reports["fsdp"]["opt_state_bytes"] < r["opt_state_bytes"] / 2
    assert r["steps"]["train"]["alias_bytes"] > 0  # the donated state is updated in place


def test_launcher_reports_the_local_devices(data_root, tmp_path):
    out = str(tmp_path / "aot.json")
    proc = run_module("launch.aot", f"--config=tests/train/fixtures.py:{data_root}", f"--json={out}",
                      "--steps=train,eval", "--chip_memory_gib=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train (batch 8): peak" in proc.stdout and "-> fits" in proc.stdout
    with open(out) as f:
        report = json.load(f)
    assert report["topology"] == "local" and set(report["steps"]) == {"train", "eval"}
    assert report["steps"]["train"]["chip_bytes"] == 2 ** 30
    proc = run_module("launch.aot", f"--config=tests/train/fixtures.py:{data_root}", "--topology=v99:9x9")
    assert proc.returncode == 2 and "--topology=v99:9x9" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_module("launch.aot", f"--config=tests/train/fixtures.py:{data_root}", "--steps=train,decode")
    assert proc.returncode == 2 and "unknown ['decode']" in proc.stderr
