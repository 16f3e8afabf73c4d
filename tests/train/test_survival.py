"""Runs that survive what pods do to them: damaged checkpoints, another mesh or process count
on restart, a changed config, duplicate log rows after a resume — and (through the launcher)
SIGTERM / SIGINT and two processes against one."""
import glob
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxaudio.train.checkpoint import restore_run_variables
from jaxaudio.train.loop import Trainer
from jaxaudio.train.run_config import ConfigDrift
from launch_util import ROOT, run_module
from train.fixtures import make_clips, tiny_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("clips"))
    make_clips(root)
    return root


def _config(root, steps, total=6):
    c = tiny_config(root, steps)
    c.optim.total_steps = total  # one schedule for the cut runs and the whole one
    return c


def _params(trainer):
    return jax.tree.map(np.asarray, jax.device_get(trainer.state.params))


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    """The uninterrupted 6-step run, and a run cut after step 4 (checkpoints 2 and 4)."""
    base = tmp_path_factory.mktemp("runs")
    full = Trainer(_config(data_root, 6), str(base / "full"))
    full.train()
    Trainer(_config(data_root, 4), str(base / "cut")).train()
    return {"full": _params(full), "losses": [h["loss"] for h in full.history], "cut": str(base / "cut")}


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _event_steps(workdir, tag="train/loss"):
    """The steps of `tag` in the TensorBoard event files (TFRecord framing read directly)."""
    from tensorboardX.proto import event_pb2
    steps = []
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def _biggest_file(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _biggest_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garble(step_dir):
    path = _biggest_file(step_dir)
    with open(path, "r+b") as f:
        f.write(np.random.default_rng(0).bytes(os.path.getsize(path)))


def _garble_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "wb") as f:
        f.write(b"\x00not json" * 8)


def _drop_item(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))


def _empty(step_dir):
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


@pytest.mark.parametrize("damage", [_truncate, _garble, _garble_metadata, _drop_item, _empty],
                         ids=["truncated", "garbage", "garbage_metadata", "missing_item", "empty_step"])
def test_damaged_newest_checkpoint_falls_back(runs, data_root, tmp_path, damage, caplog):
    """The newest checkpoint fails: one warning naming it, moved aside (kept), the one before
    restored; the finished run equals the uninterrupted one bitwise and logs each step once."""
    workdir = str(tmp_path / "run")
    shutil.copytree(runs["cut"], workdir)
    damage(os.path.join(workdir, "checkpoints", "4"))
    resumed = Trainer(_config(data_root, 6), workdir)
    with caplog.at_level("WARNING", logger="jaxaudio.train.checkpoint"):
        resumed.train()
    warnings = [r.getMessage() for r in caplog.records if r.name == "jaxaudio.train.checkpoint"]
    assert len(warnings) == 1 and "checkpoint step 4" in warnings[0] and "moved to" in warnings[0]
    assert len(glob.glob(os.path.join(workdir, "checkpoints.damaged", "4-*"))) == 1
    assert [h["step"] for h in resumed.history] == [3, 4, 5, 6]
    jax.tree.map(np.testing.assert_array_equal, runs["full"], _params(resumed))
    # Steps 3 and 4 were logged by the cut run and again now: one row each remains.
    assert [r["step"] for r in _rows(workdir) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert _event_steps(workdir) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in _rows(workdir)], runs["losses"], rtol=1e-6)


def test_restores_on_another_mesh(runs, data_root, tmp_path):
    """A 1-device checkpoint resumes on a (data 4, fsdp 2) mesh: the restored values are
    the saved ones, laid out by the new mesh, and training goes on."""
    workdir = str(tmp_path / "run")
    shutil.copytree(runs["cut"], workdir)
    cfg = _config(data_root, 6)
    cfg.mesh.update(dict(data=4, fsdp=2))
    t = Trainer(cfg, workdir)
    assert t.restore_or_init() == 4
    saved = restore_run_variables(runs["cut"])[1]["params"]
    jax.tree.map(np.testing.assert_array_equal, saved, _params(t))
    qkv = t.state.params["blocks_0"]["attn"]["qkv"]["kernel"]
    assert len({str(s.index) for s in qkv.addressable_shards}) == 2  # fsdp splits it
    t.train()
    assert int(t.state.step) == 6


def test_a_changed_config_is_refused(runs, data_root, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(runs["cut"], workdir)
    changed = _config(data_root, 6)
    changed.optim.lr = 2e-3
    changed.train.batch_size = 4
    changed.train.log_every = 3  # not a result: may change
    with pytest.raises(ConfigDrift, match=r"optim\.lr: 0\.001 -> 0\.002") as e:
        Trainer(changed, workdir).train()
    assert "train.batch_size: 8 -> 4" in str(e.value) and "log_every" not in str(e.value)
    Trainer(changed, workdir, allow_config_change=True).train()
    assert len(glob.glob(os.path.join(workdir, "config.*.json"))) == 1  # the first start's record, kept
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["optim"]["lr"] == 2e-3


def test_schedule_reads_train_steps_when_the_run_starts(data_root, tmp_path):
    c = tiny_config(data_root, 3)
    c.optim.total_steps = 0
    t = Trainer(c, str(tmp_path / "run"))
    assert c.optim.total_steps == 3 and float(t.schedule(3)) == pytest.approx(c.optim.min_lr, abs=1e-9)


# ---- through the launcher: signals, and two processes -------------------------------------

def _train_cmd(root, steps, workdir, *extra):
    return [sys.executable, "-m", "launch.train", f"--config=tests/train/fixtures.py:{root},{steps}",
            f"--workdir={workdir}", "--config.train.checkpoint_every=1000", "--config.optim.total_steps=300",
            *extra]


def _interrupt(cmd, workdir, signum, after_rows):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= after_rows:
            proc.send_signal(signum)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_sigterm_and_sigint_save_and_resume_bitwise(data_root, tmp_path):
    workdir, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    steps = 300
    code, err = _interrupt(_train_cmd(data_root, steps, workdir), workdir, signal.SIGTERM, after_rows=5)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("SIGTERM: stopped after step")]
    assert len(line) == 1 and "Traceback" not in err, err[-2000:]
    first_stop = int(line[0].split("step ")[1].split()[0])
    assert 5 <= first_stop < steps and os.path.isdir(os.path.join(workdir, "checkpoints", str(first_stop)))
    code, err = _interrupt(_train_cmd(data_root, steps, workdir), workdir, signal.SIGINT,
                           after_rows=first_stop + 5)
    assert code == 128 + signal.SIGINT and "SIGINT: stopped after step" in err and "Traceback" not in err, err[-2000:]
    done = subprocess.run(_train_cmd(data_root, steps, workdir), cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    whole = subprocess.run(_train_cmd(data_root, steps, ref), cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    jax.tree.map(np.testing.assert_array_equal, restore_run_variables(ref)[1], restore_run_variables(workdir)[1])
    assert [r["step"] for r in _rows(workdir)] == list(range(1, steps + 1))
    assert [r["loss"] for r in _rows(workdir)] == [r["loss"] for r in _rows(ref)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_as_one(data_root, tmp_path):
    """Two CPU processes (one device each, gloo collectives on 127.0.0.1) against one process
    with two devices, the same global batch: the same losses and parameters; the two-process
    run then evaluates and resumes in one process."""
    steps, port = 3, _free_port()
    mesh = "--config.mesh.data=-1"
    one = str(tmp_path / "one")
    env1 = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(_train_cmd(data_root, steps, one, mesh), cwd=ROOT, env=env1, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = str(tmp_path / "two")
    env2 = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen(_train_cmd(data_root, steps, two, mesh, "--distributed",
                                         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                         f"--process_id={i}"), cwd=ROOT, env=env2, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    losses_one = [r["loss"] for r in _rows(one)]
    losses_two = [r["loss"] for r in _rows(two)]
    assert len(losses_two) == steps
    diff = float(np.max(np.abs(np.subtract(losses_one, losses_two))))
    print(f"two processes vs one: max loss difference {diff:.3g}")
    assert diff < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 restore_run_variables(one)[1], restore_run_variables(two)[1])
    # The two-process checkpoint, in one process on one device: resume two more steps.
    proc = run_module("launch.train", f"--config=tests/train/fixtures.py:{data_root},{steps + 2}",
                      f"--workdir={two}", "--config.train.checkpoint_every=1000", "--config.optim.total_steps=300")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in _rows(two)] == list(range(1, steps + 3))


def test_sigterm_to_one_process_stops_both_after_the_same_step(data_root, tmp_path):
    """A preemption notice may reach one host only: the processes agree every step, both
    finish the same step, save it (one checkpoint) and exit 143; one process resumes it."""
    port, workdir = _free_port(), str(tmp_path / "two")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen(_train_cmd(data_root, 300, workdir, "--config.mesh.data=-1", "--distributed",
                                         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                         f"--process_id={i}"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(path) and sum(1 for _ in open(path)) >= 3:
            procs[1].send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    errs = [p.communicate(timeout=300)[1] for p in procs]
    lines = [[x for x in err.splitlines() if x.startswith("SIGTERM: stopped after step")] for err in errs]
    for p, err, line in zip(procs, errs, lines):
        assert p.returncode == 128 + signal.SIGTERM and len(line) == 1, err[-2000:]
    assert lines[0] == lines[1]  # the same step on both
    stop = int(lines[0][0].split("step ")[1].split()[0])
    assert max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == stop
    proc = run_module("launch.train", f"--config=tests/train/fixtures.py:{data_root},{stop + 2}", f"--workdir={workdir}",
                      "--config.train.checkpoint_every=1000", "--config.optim.total_steps=300")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in _rows(workdir)] == list(range(1, stop + 3))
