"""The TPU-slice and SLURM launchers: their dry runs (each host's exact command), the sbatch
script run through bash with stub scontrol/srun/python, the usage errors, and launch/cluster.py's
pieces. No network and no real gcloud or sbatch."""
import os
import shlex
import stat
import subprocess
import sys

import pytest

from launch import cluster
from launch_util import ROOT, run_module

TRAIN = ["python", "-m", "launch.train", "--config=configs/bat.py", "--config.name=my run", "--workdir=gs://b/run"]


def _ok(proc):
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def _prefixed(lines, prefix):
    return [line[len(prefix):] for line in lines if line.startswith(prefix)]


def _one_line_error(proc, message, exitcode=2):
    assert proc.returncode == exitcode and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr, proc.stderr


def test_tpu_dry_run_shows_every_worker_and_the_gcloud_line():
    lines = _ok(run_module("launch.tpu.run", "--tpu=t", "--zone=z", "--project=p", "--workers=3", "--env=A=1",
                           "--env=B=x y", "--dry_run", "--", *TRAIN, timeout=60))
    workers = [line for line in lines if line.startswith("worker ")]
    expected = ("cd ~/jaxaudio && export A=1 B='x y' && exec python -m launch.train --config=configs/bat.py "
                "'--config.name=my run' --workdir=gs://b/run --distributed")
    assert workers == [f"worker {i}: {expected}" for i in range(3)]
    assert shlex.split(expected)[-len(TRAIN) - 1:] == [*TRAIN, "--distributed"]  # the spaced argument stays one
    gcloud = shlex.split(lines[-1])
    assert gcloud == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t", "--zone=z", "--project=p", "--worker=all",
                      f"--command={expected}"]
    assert len(lines) == 4


def test_tpu_keeps_a_given_distributed_and_a_repo_dir_with_spaces():
    lines = _ok(run_module("launch.tpu.run", "--tpu=t", "--zone=z", "--workers=1", "--repo_dir=~/my repo", "--dry_run",
                           "--", "python3", "-m", "launch.evaluate", "--distributed", "--config=c.py", timeout=60))
    assert lines[0] == "worker 0: cd ~/'my repo' && exec python3 -m launch.evaluate --distributed --config=c.py"


def test_tpu_runs_gcloud_once(tmp_path):
    """Without --dry_run: gcloud (a stub recording its arguments) gets exactly the printed line."""
    _stub(tmp_path, "gcloud", 'printf "%s\\n" "$@" > "$STUB_OUT"')
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", STUB_OUT=str(tmp_path / "args"))
    args = ["--tpu=t", "--zone=z", "--", *TRAIN]
    proc = subprocess.run([sys.executable, "-m", "launch.tpu.run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    dry = _ok(run_module("launch.tpu.run", "--workers=1", "--dry_run", *args, timeout=60))
    assert (tmp_path / "args").read_text().splitlines() == shlex.split(dry[-1])[1:]


def test_slurm_dry_run_resolves_each_host():
    lines = _ok(run_module("launch.gpu.slurm", "--nodes=3", "--partition=gpu", "--repo_dir=/shared/jaxaudio",
                           "--env=A=1", "--hosts=a1,b2,c3", "--port=999", "--dry_run", "--", *TRAIN, timeout=60))
    assert "#SBATCH --nodes=3" in lines and "#SBATCH --ntasks-per-node=1" in lines
    assert "#SBATCH --gpus-per-node=8" in lines and "#SBATCH --partition=gpu" in lines
    assert "#SBATCH --time=24:00:00" in lines and "#SBATCH --output=slurm-%j.out" in lines
    assert 'COORD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p):999' in lines
    hosts = [line for line in lines if line.startswith("host ")]
    assert len(hosts) == 3
    for i, (host, line) in enumerate(zip(["a1", "b2", "c3"], hosts)):
        prefix = f"host {host} (process {i}): "
        assert line.startswith(prefix)
        words = shlex.split(line[len(prefix):])
        assert words[:5] == ["cd", "/shared/jaxaudio", "&&", "export", "A=1"]
        assert words[6:] == ["exec", *TRAIN, "--distributed", "--coordinator_address=a1:999", "--num_processes=3",
                             f"--process_id={i}"]


def test_slurm_script_runs_each_node_with_its_own_ids(tmp_path):
    """The sbatch script through bash, with stubs: srun runs its command once per node with
    SLURM_NODEID set, `python` prints its arguments; they match the dry run's host lines."""
    repo = tmp_path / "my repo"
    repo.mkdir()
    args = ["--nodes=2", f"--repo_dir={repo}", "--env=B=x y", "--dry_run", "--", *TRAIN]
    lines = _ok(run_module("launch.gpu.slurm", "--hosts=n7,n8", *args, timeout=60))
    script = "\n".join(lines[:next(i for i, line in enumerate(lines) if line.startswith("host "))])
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _stub(stubs, "scontrol", 'seq 100000 | sed "s/^/n/; 1s/.*/n7/"')  # long, as a big allocation's list
    _stub(stubs, "srun", 'for i in 0 1; do SLURM_NODEID=$i "${@: -3}"; done')  # keeps `bash -c CMD`
    _stub(stubs, "python", 'printf "%s|%s" "$B" "$PWD"; printf "|%s" "$@"; echo')
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", SLURM_JOB_NODELIST="n[7-8]", SLURM_NNODES="2")
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for i, out in enumerate(proc.stdout.splitlines()):
        b, pwd, *argv = out.split("|")
        assert (b, pwd) == ("x y", str(repo))
        expected = shlex.split(_prefixed(lines, f"host n{7 + i} (process {i}): ")[0])
        assert ["python", *argv] == expected[expected.index("exec") + 1:]
        assert argv[-3:] == ["--coordinator_address=n7:12355", "--num_processes=2", f"--process_id={i}"]
    assert len(proc.stdout.splitlines()) == 2
    _stub(stubs, "scontrol", "exit 1")  # no coordinator: stop before srun
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stdout == ""


def test_slurm_writes_the_script_and_submits_it(tmp_path):
    _stub(tmp_path, "sbatch", 'cp "$1" "$STUB_OUT"')
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", STUB_OUT=str(tmp_path / "submitted"))
    script = tmp_path / "job.sbatch"
    args = ["--nodes=2", "--repo_dir=/r", "--", *TRAIN]
    proc = subprocess.run([sys.executable, "-m", "launch.gpu.slurm", f"--script={script}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == f"wrote {script}\n", proc.stderr
    dry = _ok(run_module("launch.gpu.slurm", "--dry_run", *args, timeout=60))
    assert (tmp_path / "submitted").read_text() == script.read_text() == "\n".join(dry[:dry.index("")]) + "\n"


def _stub(folder, name, body):
    path = folder / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("module,args,message", [
    ("launch.tpu.run", ["--tpu=t", "--zone=z", "--workers=2", "--dry_run"], "no command: put it after --"),
    ("launch.tpu.run", ["--tpu=t", "--zone=z", "--workers=2", "--dry_run", "--"], "no command"),
    ("launch.tpu.run", ["--tpu=t", "--zone=z", "--dry_run", "--", "ls", "-l"], "not a launcher: ls -l"),
    ("launch.tpu.run", ["--tpu=t", "--zone=z", "--dry_run", "--", *TRAIN], "--dry_run needs --workers"),
    ("launch.tpu.run", ["--tpu=t", "--zone=z", "--workers=1", "--dry_run", "--env=NOEQUALS", "--", *TRAIN],
     "--env=NOEQUALS: expected KEY=VALUE"),
    ("launch.tpu.run", ["--zone=z", "--", *TRAIN], "--tpu must have a value"),
    ("launch.tpu.run", ["--tpu=t", "--zone=z", *TRAIN], "(the command to run goes after --)"),
    ("launch.gpu.slurm", ["--nodes=0", "--dry_run", "--", *TRAIN], "flag --nodes=0"),
    ("launch.gpu.slurm", ["--nodes=2", "--dry_run", "--", "python", "-m", "launch.infer"], "not a launcher"),
    ("launch.gpu.slurm", ["--nodes=2", "--hosts=a", "--dry_run", "--", *TRAIN], "--hosts names 1 node(s), --nodes=2"),
    ("launch.gpu.slurm", ["--nodes=2", "--dry_run", "--", *TRAIN, "--process_id=3"], "drop --process_id"),
])
def test_usage_errors_are_one_line(module, args, message):
    _one_line_error(run_module(module, *args, timeout=60), message)


def test_missing_gcloud_or_sbatch_is_one_line():
    env = dict(os.environ, PATH="")
    for module, tool, flags in [("launch.tpu.run", "gcloud", ["--tpu=t", "--zone=z"]),
                                ("launch.gpu.slurm", "sbatch", ["--nodes=1"])]:
        proc = subprocess.run([sys.executable, "-m", module, *flags, "--", *TRAIN], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        _one_line_error(proc, f"{tool} is not on PATH", exitcode=1)
    assert not os.path.exists(os.path.join(ROOT, "jaxaudio.sbatch"))  # nothing written before the check


def test_launcher_command():
    assert cluster.launcher_command([], TRAIN) == TRAIN
    assert cluster.launcher_command([], [".venv/bin/python", "-u", "-m", "launch.evaluate"])
    for positional, command, message in [
        ([], None, "no command"), ([], [], "no command"), (["x"], TRAIN, "unexpected arguments before --: x"),
        ([], ["python", "-m", "launch.infer"], "not a launcher"), ([], ["bash", "-m", "launch.train"], "not a launcher"),
        ([], ["python", "-m"], "not a launcher"), ([], ["python", "launch/train.py"], "not a launcher"),
    ]:
        with pytest.raises(cluster.CommandError, match=message):
            cluster.launcher_command(positional, command)


def test_multihost_command():
    base = ["python", "-m", "launch.train", "--workdir=w"]
    assert cluster.multihost_command(base) == [*base, "--distributed"]
    assert cluster.multihost_command([*base, "--distributed"]) == [*base, "--distributed"]
    out = cluster.multihost_command(base, coordinator_address=cluster.Raw("$COORD"), process_id="2")
    assert out == [*base, "--distributed", "--coordinator_address=$COORD", "--process_id=2"]
    assert isinstance(out[-2], cluster.Raw) and not isinstance(out[-1], cluster.Raw)
    with pytest.raises(cluster.CommandError, match="drop --num_processes"):
        cluster.multihost_command([*base, "--num_processes=4"], num_processes="2")
    for bad in ("--nodistributed", "--distributed=false"):
        with pytest.raises(cluster.CommandError, match="pass --distributed bare"):
            cluster.multihost_command([*base, bad])


def test_env_quoting_and_host_command():
    assert cluster.parse_env(["A=1", "B=x=y z", "C="]) == {"A": "1", "B": "x=y z", "C": ""}
    for bad in ("A", "1A=2", "A-B=1", "=1"):
        with pytest.raises(cluster.CommandError, match=f"--env={bad}:"):
            cluster.parse_env([bad])
    assert cluster.quote_path("~/my repo") == "~/'my repo'" and cluster.quote_path("~") == "~/"
    assert cluster.quote_path("/a b") == "'/a b'" and cluster.quote_path("~user/x") == "'~user/x'"
    assert cluster.shell_join(["a b", cluster.Raw("--x=$Y"), "$Z"]) == "'a b' --x=$Y '$Z'"
    line = cluster.host_command("/", {"K": "v w"}, ["python", "-m", "launch.train", "--a=b c"])
    assert line == "cd / && export K='v w' && exec python -m launch.train '--a=b c'"
    out = subprocess.run(["bash", "-c", line.replace("exec python -m launch.train", 'printf "%s|" "$K"')],
                         cwd="/", capture_output=True, text=True).stdout
    assert out == "v w|--a=b c|"
