"""The contract between a model and the trainer.

A task builds its model from the config, initialises (or loads) its variables, defines
the loss and the evaluation, says which parameters train, and supplies the data. The
trainer (`jaxaudio.train.loop`) does everything else, for every model.
"""
import abc
from typing import Any, Iterator

import flax.linen as nn
import grain
import jax
import numpy as np
from ml_collections import ConfigDict

Batch = dict[str, np.ndarray]
Variables = dict[str, Any]


class Task(abc.ABC):
    """Subclass per model; `jaxaudio.tasks.register(name)` makes it reachable from configs."""

    def __init__(self, config: ConfigDict):
        self.config = config
        self.model: nn.Module = self.build_model()

    # --- model -------------------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The Linen module, sized by `self.config.model`."""

    @abc.abstractmethod
    def dummy_batch(self, batch_size: int) -> Batch:
        """A batch of zeros with the real shapes and dtypes (for init and abstract eval)."""

    def batch_spec(self, batch_size: int, train: bool = True) -> Batch:
        """Zeros with the shapes and dtypes of a whole training (or, `train=False`,
        evaluation) batch: every key `loss_fn` / `eval_step` reads, for compiling the steps
        ahead of time without data (`launch/aot.py`). Tasks whose batches hold more than
        `dummy_batch` (targets, decoding prompts) add it."""
        batch = dict(self.dummy_batch(batch_size))
        if not train:
            batch["index"] = np.zeros((batch_size,), np.int32)
        return batch

    @abc.abstractmethod
    def init_variables(self, rng: jax.Array) -> Variables:
        """Fresh variables (with logical-axis boxes) — `params` plus any extra collections."""

    def pretrained_parts(self) -> dict[str, str]:
        """`{part: path}`: converted checkpoints or training-run workdirs of sub-modules
        (e.g. a frozen encoder and LLM) that the trainer loads into the variables under
        `<collection>/<part>/` after `init_variables` (LoRA adapters stay fresh); used
        when `config.init.checkpoint` (a whole model) is not set."""
        return {}

    def bind_variables(self, variables: Variables) -> None:
        """Called by the trainer with the run's variables (device arrays) once they are
        initialised or loaded, and again after a restore, before any batch is read: a task
        whose data depends on the model (a frozen encoder's cached outputs) computes it here."""

    def layer_scale(self, path: str) -> float:
        """Learning-rate multiplier for the parameter at `path` (layer-wise decay)."""
        return 1.0

    # --- objective -----------------------------------------------------------------------
    @abc.abstractmethod
    def loss_fn(self, params: Any, extra: Variables, batch: Batch, rng: jax.Array
                ) -> tuple[jax.Array, tuple[dict[str, jax.Array], Variables]]:
        """`(loss, (metrics, new_extra))` for one (micro)batch in training mode."""

    @abc.abstractmethod
    def eval_step(self, params: Any, extra: Variables, batch: Batch) -> dict[str, jax.Array]:
        """Per-example outputs `[batch, ...]` the host collects for `eval_metrics`."""

    @abc.abstractmethod
    def eval_metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        """Metrics over the whole evaluation set (`chance_<name>` entries print beside them)."""

    # --- data --------------------------------------------------------------------------
    def checked_splits(self, eval_data: str) -> list[str]:
        """The splits a task checks before step 1: "train", and "eval" when its data is
        generated, given (`eval_data`, the config's eval file) or read (`train.eval_every`)."""
        read = self.config.data.get("generate") or eval_data or self.config.train.get("eval_every")
        return ["train", "eval"] if read else ["train"]

    def prepare_data(self) -> None:
        """Make sure the data exists (e.g. generate it); the trainer runs it on process 0."""

    @abc.abstractmethod
    def train_source(self) -> grain.MapDataset:
        """Training examples (dicts of numpy arrays), unbatched and unshuffled."""

    @abc.abstractmethod
    def eval_source(self) -> grain.MapDataset:
        """Evaluation examples, in order."""

    def augment(self, ds: grain.MapDataset, seed: int) -> grain.MapDataset:
        """Per-example training augmentation, applied after shuffle and repeat (so each epoch
        differs) with seeded per-index randomness (so a resumed run repeats it)."""
        return ds


def eval_batches(source: grain.MapDataset, batch_size: int) -> Iterator[Batch]:
    """The whole evaluation set in order, the last batch padded; `valid` marks real rows."""
    n = len(source)
    for start in range(0, n, batch_size):
        rows = [source[i] for i in range(start, min(start + batch_size, n))]
        valid = np.zeros(batch_size, bool)
        valid[:len(rows)] = True
        rows += [rows[-1]] * (batch_size - len(rows))
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        batch["valid"] = valid
        yield batch
