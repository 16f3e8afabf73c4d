"""The run's resolved config, kept in `<workdir>/config.json`: a restart may not silently change it.

At the first start the config (after the trainer resolved `optim.total_steps`) is written.
A restart compares: keys that change what is computed (model, data, batch, optimizer,
schedule, seed, task) must be equal, or the restart is refused with the differing keys
listed, unless `allow` (the launchers' `--allow_config_change`); then the new config is
stored and the old one kept as `config.<time>.json`. Keys that only change how the run is
carried out may differ freely: `RUNTIME_KEYS`.
"""
import json
import logging
import os
import re
import time

import jax
from ml_collections import ConfigDict

from jaxaudio.data.manifest import write_json_atomic

log = logging.getLogger(__name__)

# How often to log / evaluate / save, the number of steps (extending a run; the schedule's
# length is `optim.total_steps`, compared), data-loading threads, the layout (a run resumes on
# another mesh), where the first start's weights came from, what evaluation reads, and what
# the blocks recompute for the backward pass (memory against time; the same values).
RUNTIME_KEYS = re.compile(r"train\.(steps|log_every|eval_every|checkpoint_every|keep_checkpoints|data_threads"
                          r"|data_prefetch|eval_batch_size)|mesh\..*|init\..*|eval\..*|model\.(\w+\.)?(remat|scan_layers)")


class ConfigDrift(ValueError):
    pass


def _flat(tree, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_run_config(config: ConfigDict, workdir: str, allow: bool = False) -> None:
    """Store `config` in `workdir` at the first start; refuse a restart that changes results."""
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=1, sort_keys=True)
    now = _flat(json.loads(text))
    if os.path.exists(path):
        with open(path) as f:
            try:
                saved = _flat(json.load(f))
            except json.JSONDecodeError as e:
                raise ConfigDrift(f"{path} is not valid JSON ({e}); move it away to start the config record afresh")
        keys = sorted(k for k in set(now) | set(saved) if not RUNTIME_KEYS.fullmatch(k) and now.get(k) != saved.get(k))
        if not keys:
            if jax.process_index() == 0 and now != saved:
                write_json_atomic(path, json.loads(text))  # runtime keys: the record follows the latest start
            return
        lines = [f"{k}: {saved.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}" for k in keys]
        if not allow:
            raise ConfigDrift(f"{workdir} was started with another config; these keys change the results:\n  "
                              + "\n  ".join(lines[:40]) + "\nrestore them, use another --workdir, or pass "
                              "--allow_config_change to go on with the new values")
        log.warning("--allow_config_change: going on with changed keys: %s", "; ".join(lines))
        if jax.process_index() == 0:
            os.replace(path, os.path.join(workdir, f"config.{time.strftime('%Y%m%d-%H%M%S')}.json"))
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_json_atomic(path, json.loads(text))
