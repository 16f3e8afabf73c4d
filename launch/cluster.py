"""What the multi-host launchers (launch/tpu/run.py, launch/gpu/slurm.py) share: the launcher
command after `--`, the multi-host flags it gets, `--env KEY=VALUE` and shell quoting.

    python -m launch.tpu.run --tpu=T --zone=Z --workers=2 --dry_run -- python -m launch.train ...
    python -m launch.gpu.slurm --nodes=2 --dry_run -- python -m launch.train ...

Only stdlib and absl: a dry run imports no JAX.
"""
import os
import re
import shlex
import sys

from absl import app, flags

# The launchers that call jax.distributed.initialize() under --distributed.
LAUNCHERS = ("launch.train", "launch.evaluate")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class CommandError(ValueError):
    """A bad invocation, reported as one line (exit 2), or a missing tool (exit 1)."""

    def __init__(self, message: str, exitcode: int = 2):
        super().__init__(message)
        self.exitcode = exitcode


class Raw(str):
    """A token the remote shell must expand (`--process_id=$SLURM_NODEID`): left unquoted."""


def _prog() -> str:
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec else os.path.basename(sys.argv[0])


def _fail(message: str, exitcode: int) -> None:
    sys.stderr.write(f"{_prog()}: error: {message}\n")
    sys.exit(exitcode)


def parse_args(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """app.run's flags_parser: absl flags before `--`, the command after it (None without `--`).

    Splitting before absl sees the command keeps the launcher's own flags (`--config=...`)
    from being parsed as ours; absl's flag errors become one line.
    """
    cut = argv.index("--") if "--" in argv else len(argv)
    try:
        rest = flags.FLAGS(argv[:cut])
    except flags.Error as e:
        hint = "" if cut < len(argv) else " (the command to run goes after --)"
        _fail(f"{e}{hint}", 2)
    return rest[1:], (argv[cut + 1:] if cut < len(argv) else None)


def run(main) -> None:
    """app.run(main(positional, command)) with parse_args; a CommandError is one stderr line."""
    def wrapped(parsed):
        try:
            return main(*parsed)
        except CommandError as e:
            _fail(str(e), e.exitcode)
    app.run(wrapped, flags_parser=parse_args)


def launcher_command(positional: list[str], command: list[str] | None) -> list[str]:
    """The command after `--`, checked to be `python [opts] -m launch.train|launch.evaluate ...`."""
    if positional:
        raise CommandError(f"unexpected arguments before --: {shlex.join(positional)}")
    if not command:
        raise CommandError("no command: put it after --, e.g. -- python -m launch.train --config=... --workdir=...")
    is_python = os.path.basename(command[0]).startswith("python")
    module = command[command.index("-m") + 1] if "-m" in command[:-1] else None
    if not (is_python and module in LAUNCHERS):
        raise CommandError(f"not a launcher: {shlex.join(command)} (expected python -m {' or '.join(LAUNCHERS)} ...)")
    return command


def _flag_name(token: str) -> str | None:
    return token[2:].split("=", 1)[0] if token.startswith("--") else None


def multihost_command(command: list[str], **values: str) -> list[str]:
    """`command` plus `--distributed` (unless already there) and `--name=value` for each value.

    The launcher sets these; one the user also set would be a second, conflicting source
    of process ids, so that is an error rather than silently dropped.
    """
    names = [_flag_name(t) for t in command[command.index("-m") + 2:]]
    if "nodistributed" in names or any(t.startswith("--distributed=") for t in command):
        raise CommandError("pass --distributed bare or not at all: the launcher adds it")
    taken = [n for n in values if n in names]
    if taken:
        raise CommandError(f"drop {', '.join('--' + n for n in taken)} from the command: the launcher sets it")
    extra = [] if "distributed" in names else ["--distributed"]
    for name, value in values.items():
        token = f"--{name}={value}"
        extra.append(Raw(token) if isinstance(value, Raw) else token)
    return [*command, *extra]


def parse_env(pairs: list[str]) -> dict[str, str]:
    """`--env KEY=VALUE` flags as a dict (the value may hold `=` and spaces)."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _ENV_KEY.fullmatch(key):
            raise CommandError(f"--env={pair}: expected KEY=VALUE with KEY a shell variable name")
        env[key] = value
    return env


def shell_join(tokens: list[str]) -> str:
    """shlex.join, except Raw tokens, which the shell is meant to expand."""
    return " ".join(t if isinstance(t, Raw) else shlex.quote(t) for t in tokens)


def quote_path(path: str) -> str:
    """shlex.quote, keeping a leading `~/` outside the quotes so the remote shell expands it
    to the remote user's home."""
    if path == "~" or path.startswith("~/"):
        rest = path[2:]
        return "~/" + (shlex.quote(rest) if rest else "")
    return shlex.quote(path)


def host_command(repo_dir: str, env: dict[str, str], command: list[str]) -> str:
    """What one host's shell runs: `cd REPO && export K=V ... && exec CMD`.

    `exec` so that the scheduler's (or ssh's) signals reach the Python process directly.
    """
    parts = [f"cd {quote_path(repo_dir)}"]
    if env:
        parts.append("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
    parts.append("exec " + shell_join(command))
    return " && ".join(parts)
