"""The training batches as a function of the step: what makes a run's data position the step.

The global stream is the task's examples shuffled (a new order each epoch, from the seed),
repeated and augmented per global index. The global batch of step s (1-based) is the
stream's elements [(s-1)·B, s·B); process p of P reads rows [p·B/P, (p+1)·B/P) of it, so
the global batch, row for row, is the same for any number of processes, and a resumed run
starts reading at its step with nothing but the step saved.
"""
from typing import Any, Callable, Iterator

import grain


class ProcessRows(grain.MapDataset):
    """Process `process`'s rows of the global batches from step `start` + 1 on: element k
    is the global stream's element `(start + k // local) * batch + process * local + k % local`."""

    def __init__(self, parent: grain.MapDataset, batch: int, process: int, processes: int, start: int = 0):
        super().__init__(parent)
        if batch % processes:
            raise ValueError(f"config.train.batch_size={batch} is not divisible by the {processes} processes")
        self.global_batch, self.local, self.process, self.start = batch, batch // processes, process, start

    def __len__(self) -> int:
        return max(0, len(self._parent) // self.global_batch - self.start) * self.local

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        step, row = divmod(k, self.local)
        return self._parent[(self.start + step) * self.global_batch + self.process * self.local + row]

    def __str__(self) -> str:
        return f"ProcessRows(batch={self.global_batch}, process={self.process}, start={self.start})"


def train_batches(source: grain.MapDataset, *, seed: int, batch_size: int, start_step: int, process: int,
                  processes: int, augment: Callable[[grain.MapDataset, int], grain.MapDataset] | None = None,
                  threads: int = 1, prefetch: int = 1) -> Iterator[dict[str, Any]]:
    """This process's local batches `[batch_size / processes, ...]` of steps `start_step + 1`, ..."""
    ds = source.shuffle(seed=seed).repeat(None)
    if augment is not None:
        ds = augment(ds, seed)
    ds = ProcessRows(ds, batch_size, process, processes, start_step)
    ds = ds.batch(batch_size // processes, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))
