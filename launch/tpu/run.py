"""Run one launcher command on every worker (host) of a TPU VM slice.

    python -m launch.tpu.run --tpu=my-v5e --zone=us-west4-a --workers=2 --dry_run -- \
        python -m launch.train --config=configs/bat.py --workdir=gs://bucket/run
    python -m launch.tpu.run --tpu=my-v5e --zone=us-west4-a --env=XLA_FLAGS=... -- python -m launch.train ...

Every worker runs `cd REPO_DIR && exec CMD --distributed` through
`gcloud compute tpus tpu-vm ssh --worker=all`; jax.distributed.initialize() finds the
slice's coordinator and process ids itself. --dry_run prints each worker's command and the
gcloud line and runs nothing.
"""
import shlex
import shutil
import subprocess

from absl import flags

from launch.cluster import CommandError, host_command, launcher_command, multihost_command, parse_env, run

_TPU = flags.DEFINE_string("tpu", None, "TPU VM name.")
_ZONE = flags.DEFINE_string("zone", None, "Its zone.")
_PROJECT = flags.DEFINE_string("project", None, "GCP project (default: gcloud's).")
_WORKERS = flags.DEFINE_integer("workers", None, "Hosts in the slice (what --dry_run lists).", lower_bound=1)
_REPO_DIR = flags.DEFINE_string("repo_dir", "~/jaxaudio", "The jaxaudio checkout on the workers.")
_ENV = flags.DEFINE_multi_string("env", [], "KEY=VALUE exported on every worker (repeatable).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print what each worker would run; run nothing.")
flags.mark_flags_as_required(["tpu", "zone"])


def gcloud_command(tpu: str, zone: str, project: str | None, remote: str) -> list[str]:
    project_flag = [f"--project={project}"] if project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}", *project_flag,
            "--worker=all", f"--command={remote}"]


def main(positional, command):
    command = multihost_command(launcher_command(positional, command))
    remote = host_command(_REPO_DIR.value, parse_env(_ENV.value), command)
    gcloud = gcloud_command(_TPU.value, _ZONE.value, _PROJECT.value, remote)
    if _DRY_RUN.value:
        if _WORKERS.value is None:
            raise CommandError("--dry_run needs --workers (the slice's host count)")
        for i in range(_WORKERS.value):
            print(f"worker {i}: {remote}")
        print(shlex.join(gcloud))
        return 0
    if shutil.which("gcloud") is None:
        raise CommandError("gcloud is not on PATH: install the Google Cloud CLI (or use --dry_run)", exitcode=1)
    return subprocess.run(gcloud).returncode


if __name__ == "__main__":
    run(main)
