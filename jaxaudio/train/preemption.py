"""Stopping a run cleanly on SIGTERM (what a preemption or `scancel` sends) or SIGINT (Ctrl-C).

The signal only raises a flag; the trainer finishes the step it is in, saves, and raises
`Preempted`, which the launcher turns into one line and exit status 128 + the signal's
number. A second signal of the same kind is not caught (a second Ctrl-C stops at once).
With several processes the signal may reach only some of them, so every step the processes
agree (one tiny all-gather) and all stop after the same step.
"""
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    def __init__(self, step: int, signum: int, workdir: str):
        self.step, self.signum, self.workdir = step, signum, workdir
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped after step {step} and saved it in {workdir}/checkpoints; "
                         f"the same command resumes from there")


class PreemptionGuard:
    """Context manager: while inside, SIGTERM / SIGINT set `signum` instead of killing."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = self.signum or signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # the next one is not caught

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():  # signals can only be handled there
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def requested(self) -> int:
        """The signal to stop on (0: none); the same answer on every process."""
        if jax.process_count() == 1:
            return self.signum
        flags = multihost_utils.process_allgather(np.int32(self.signum))
        return int(np.max(flags))
