"""Metrics to TensorBoard event files, `metrics.jsonl` and a console progress bar (process 0 only)."""
import json
import os
import time

import jax
from tqdm import tqdm


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.tb = None
        self.bar = None
        self.jsonl = os.path.join(workdir, "metrics.jsonl")
        if self.enabled:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            mininterval=1.0)
        self._last = (time.perf_counter(), start_step)

    def scalars(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
        self.tb.flush()
        with open(self.jsonl, "a") as f:  # the same numbers, easy to read back
            f.write(json.dumps({"split": prefix, "step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")

    def progress(self, step: int, metrics: dict[str, float]) -> float:
        """Advance the bar to `step`; returns steps/s since the last call."""
        now, (then, last_step) = time.perf_counter(), self._last
        rate = (step - last_step) / max(now - then, 1e-9)
        self._last = (now, step)
        if self.enabled:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({"loss": f"{metrics.get('loss', float('nan')):.4f}", "steps/s": f"{rate:.2f}"})
        return rate

    def log(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
