"""Submit one launcher command as a SLURM multi-node GPU job: one process per node, which
drives all of that node's GPUs.

    python -m launch.gpu.slurm --nodes=2 --partition=gpu --dry_run -- \
        python -m launch.train --config=configs/bat.py --workdir=/shared/runs/bat
    python -m launch.gpu.slurm --nodes=2 --partition=gpu --env=XLA_PYTHON_CLIENT_MEM_FRACTION=.9 -- \
        python -m launch.train --config=configs/bat.py --workdir=/shared/runs/bat

Writes `<job_name>.sbatch` (--script) and runs `sbatch` on it. Node i runs
`cd REPO_DIR && exec CMD --distributed --coordinator_address=FIRST_NODE:PORT
--num_processes=N --process_id=i`. --dry_run prints the script and each host's command
(node names from --hosts) and submits nothing.
"""
import os
import shlex
import shutil
import subprocess

from absl import flags

from launch.cluster import CommandError, Raw, host_command, launcher_command, multihost_command, parse_env, run

_NODES = flags.DEFINE_integer("nodes", None, "Nodes (= processes).", lower_bound=1)
_GPUS = flags.DEFINE_integer("gpus_per_node", 8, "GPUs on each node.", lower_bound=1)
_PARTITION = flags.DEFINE_string("partition", None, "SLURM partition (default: the cluster's).")
_TIME = flags.DEFINE_string("time", "24:00:00", "Time limit.")
_JOB_NAME = flags.DEFINE_string("job_name", "jaxaudio", "Job name.")
_REPO_DIR = flags.DEFINE_string("repo_dir", None, "The jaxaudio checkout on the nodes (default: this directory).")
_PORT = flags.DEFINE_integer("port", 12355, "Coordinator port on the first node.", lower_bound=1, upper_bound=65535)
_OUTPUT = flags.DEFINE_string("output", "slurm-%j.out", "Log path (sbatch --output pattern).")
_ENV = flags.DEFINE_multi_string("env", [], "KEY=VALUE exported on every node (repeatable).")
_SCRIPT = flags.DEFINE_string("script", None, "Where to write the sbatch script (default: <job_name>.sbatch).")
_HOSTS = flags.DEFINE_list("hosts", None, "--dry_run only: node names to show (default node0,...).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the script and each host's command; submit nothing.")
flags.mark_flags_as_required(["nodes"])


def node_command(repo_dir: str, env: dict[str, str], command: list[str], coordinator: str, num_processes: str,
                 process_id: str) -> str:
    flags_ = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return host_command(repo_dir, env, multihost_command(command, **flags_))


def sbatch_script(nodes: int, gpus: int, partition: str | None, time: str, job_name: str, output: str, port: int,
                  per_node: str) -> str:
    partition_line = [f"#SBATCH --partition={partition}"] if partition else []
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus}",
        f"#SBATCH --time={time}",
        f"#SBATCH --output={output}",
        *partition_line,
        "set -euo pipefail",
        "# The first node of the allocation hosts jax.distributed's coordinator. Assigned, then",
        "# exported: `export X=$(...)` would hide a failing scontrol from set -e. sed, not head:",
        "# head would close the pipe early, scontrol dies of SIGPIPE and pipefail ends the job.",
        f'COORD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p):{port}',
        "export COORD",
        "# bash -c in single quotes: $SLURM_NODEID is each node's own, expanded there.",
        "# --kill-on-bad-exit: a node that fails would leave the others waiting in a collective.",
        f"srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(per_node)}",
        "",
    ])


def main(positional, command):
    command = launcher_command(positional, command)
    env, nodes, repo_dir = parse_env(_ENV.value), _NODES.value, _REPO_DIR.value or os.getcwd()
    per_node = node_command(repo_dir, env, command, Raw("$COORD"), Raw("$SLURM_NNODES"), Raw("$SLURM_NODEID"))
    script = sbatch_script(nodes, _GPUS.value, _PARTITION.value, _TIME.value, _JOB_NAME.value, _OUTPUT.value,
                           _PORT.value, per_node)
    if _DRY_RUN.value:
        hosts = _HOSTS.value or [f"node{i}" for i in range(nodes)]
        if len(hosts) != nodes:
            raise CommandError(f"--hosts names {len(hosts)} node(s), --nodes={nodes}")
        print(script)
        for i, host in enumerate(hosts):
            line = node_command(repo_dir, env, command, f"{hosts[0]}:{_PORT.value}", str(nodes), str(i))
            print(f"host {host} (process {i}): {line}")
        return 0
    if shutil.which("sbatch") is None:
        raise CommandError("sbatch is not on PATH: run this on the cluster's login node (or use --dry_run)",
                           exitcode=1)
    path = _SCRIPT.value or f"{_JOB_NAME.value}.sbatch"
    with open(path, "w") as f:
        f.write(script)
    print(f"wrote {path}")
    return subprocess.run(["sbatch", path]).returncode


if __name__ == "__main__":
    run(main)
