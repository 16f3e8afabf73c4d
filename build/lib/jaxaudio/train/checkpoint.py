"""Orbax checkpoints of the train state *and* the grain iterator position."""
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves `{state, data}` every `every` steps under `workdir/checkpoints`, keeping `keep`."""

    def __init__(self, workdir: str, every: int, keep: int = 3):
        self.manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                                 create=True, enable_async_checkpointing=False),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)), force=force)

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
        """Restore into `abstract_state`'s shapes and shardings; moves `data_iter` in place."""
        target = jax.tree.map(lambda x: ocp.utils.to_shape_dtype_struct(x), abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iter)))
        return out["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
