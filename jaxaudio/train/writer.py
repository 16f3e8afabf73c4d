"""Metrics to TensorBoard event files, `metrics.jsonl` and a console progress bar (process 0 only).

A resumed run logs each step once: rows after the restored step (logged by the run before
it stopped, then lost with its unsaved steps) are dropped from `metrics.jsonl`, and the
TensorBoard events are rebuilt from the kept rows (the old event files are moved to
`tensorboard.replaced/<time>/`, not deleted).
"""
import json
import os
import shutil
import time

import jax
from tqdm import tqdm


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.tb = None
        self.bar = None
        self.jsonl = os.path.join(workdir, "metrics.jsonl")
        replay = self._drop_after(start_step) if self.enabled else None
        if self.enabled:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            if replay is not None:
                for row in replay:
                    for k, v in row.items():
                        if k not in ("split", "step"):
                            self.tb.add_scalar(f"{row['split']}/{k}", float(v), row["step"])
                self.tb.flush()
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            mininterval=1.0)
        self._last = (time.perf_counter(), start_step)

    def _drop_after(self, step: int) -> list[dict] | None:
        """Keep the jsonl rows up to `step`; the kept rows when some were dropped (the
        TensorBoard events are then moved aside, to be rebuilt from them), else None."""
        if not os.path.exists(self.jsonl):
            return None
        with open(self.jsonl) as f:
            lines = f.read().splitlines()
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
        kept = [r for r in rows if r.get("step", 0) <= step]
        if len(kept) == len(lines):
            return None
        tmp = self.jsonl + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.jsonl)
        events = os.path.join(os.path.dirname(self.jsonl), "tensorboard")
        if os.path.isdir(events):
            aside = os.path.join(os.path.dirname(self.jsonl), "tensorboard.replaced", time.strftime("%Y%m%d-%H%M%S"))
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(events, aside)
        return kept

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
