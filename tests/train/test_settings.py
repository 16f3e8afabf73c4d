"""Settings that cannot work are refused before anything is built, naming the config key
(`jaxaudio.train.settings.check_settings`)."""
import logging

import pytest

from configs import clap_tiny, spatial_ast_tiny
from jaxaudio.train.settings import SettingsError, check_settings
from launch_util import override


def _config(**overrides):
    c = spatial_ast_tiny.get_config()
    # batch 32 and eval batch 48 split over 1, 2, 4 or 8 devices.
    c.train.update(dict(batch_size=32, eval_batch_size=48))
    return override(c, overrides)


@pytest.mark.parametrize("key,value,words", [
    ("train.steps", 0, "config.train.steps=0: a positive number of steps"),
    ("train.steps", -5, "config.train.steps=-5"),
    ("train.batch_size", 0, "config.train.batch_size=0"),
    ("train.eval_batch_size", -1, "config.train.eval_batch_size=-1"),
    ("train.accum_steps", 0, "config.train.accum_steps=0"),
    ("train.log_every", 0, "config.train.log_every=0: at least 1"),
    ("train.log_every", -1, "config.train.log_every=-1"),
    ("train.eval_every", -1, "config.train.eval_every=-1: 0 (never) or a positive number"),
    ("train.checkpoint_every", -2, "config.train.checkpoint_every=-2"),
    ("train.checkpoint_every", 0, "config.train.checkpoint_every=0"),
    ("train.keep_checkpoints", 0, "config.train.keep_checkpoints=0"),
    ("train.data_threads", -1, "config.train.data_threads=-1"),
    ("optim.lr", -1e-3, "config.optim.lr=-0.001"),
    ("optim.warmup_steps", -10, "config.optim.warmup_steps=-10"),
    ("optim.total_steps", -1, "config.optim.total_steps=-1"),
    ("optim.clamp", (("scale", 0.0),), "config.optim.clamp: entry ('scale', 0.0) is not (regex, lo, hi)"),
    ("train.loss_weights", (1.0, 1.0, 2.0), "config.train.loss_weights=(1.0, 1.0, 2.0): 4 entries (class, "
                                            "distance, azimuth, elevation)"),
    ("train.loss_weights", (1.0,) * 5, "config.train.loss_weights"),
    ("mesh.data", 0, "config.mesh.data=0: a positive number of devices, or -1"),
    ("mesh.fsdp", -2, "config.mesh.fsdp=-2"),
    ("mesh.fsdp", -1, "config.mesh: at most one axis may be -1"),
    ("mesh.fsdp", 3, "the 8 devices do not divide by the fixed axes' 3"),
    ("mesh.tensor", 16, "config.mesh={'data': -1, 'fsdp': 1, 'tensor': 16}: the 8 devices do not divide"),
    ("train.batch_size", 20, "config.train.batch_size=20: not divisible by the 8 data-parallel devices"),
    ("train.eval_batch_size", 50, "config.train.eval_batch_size=50: not divisible by the 8 data-parallel"),
])
def test_each_bad_setting_names_its_key(key, value, words):
    check_settings(_config(), 8)  # the base is fine
    with pytest.raises(SettingsError, match="1 setting cannot work") as err:
        check_settings(_config(**{key: value}), 8)
    assert words in str(err.value)


def test_mesh_sizes_and_the_data_parallel_size():
    # An explicit mesh smaller than the machine takes the first devices (tests use data=1).
    check_settings(_config(**{"mesh.data": 1, "train.eval_batch_size": 5}), 8)
    with pytest.raises(SettingsError, match=r"config.mesh=\{'data': 16, 'fsdp': 1, 'tensor': 1\} needs 16 devices, "
                                            "8 are available"):
        check_settings(_config(**{"mesh.data": 16}), 8)
    # Batches split over data x fsdp, not over tensor: 4 x 2 -> 4 data-parallel devices.
    check_settings(_config(**{"mesh.data": -1, "mesh.tensor": 2, "train.eval_batch_size": 12}), 8)
    with pytest.raises(SettingsError, match="not divisible by the 8 data-parallel devices"):
        check_settings(_config(**{"mesh.data": 4, "mesh.fsdp": 2, "train.eval_batch_size": 12}), 8)
    with pytest.raises(SettingsError, match=r"unknown axes \['model'\]"):
        check_settings(override(_config(), {"mesh": {"data": -1, "model": 2}}), 8)


def test_eval_batch_only_matters_when_evaluating():
    c = _config(**{"train.eval_batch_size": 50, "train.eval_every": 0})
    check_settings(c, 8)  # never evaluates
    with pytest.raises(SettingsError, match="eval_batch_size=50"):
        check_settings(c, 8, evaluate=True)  # launch/evaluate


def test_accumulation_splits_the_batch(caplog):
    with pytest.raises(SettingsError, match="batch_size=32: not divisible by config.train.accum_steps=3"):
        check_settings(_config(**{"train.accum_steps": 3}), 1)
    with caplog.at_level(logging.WARNING, logger="jaxaudio.train.settings"):
        check_settings(_config(**{"train.accum_steps": 4}), 8)  # 32 / 4 = 8 rows per micro-batch
        assert not caplog.records
        check_settings(_config(**{"train.accum_steps": 8}), 8)  # 4 rows over 8 devices: works, resharded
    assert "32 / accum_steps=8 = 4 rows per micro-batch do not split over the 8" in caplog.records[0].getMessage()


def test_all_problems_at_once():
    c = _config(**{"train.steps": 0, "train.log_every": 0, "mesh.data": 0})
    with pytest.raises(SettingsError, match="3 settings cannot work") as err:
        check_settings(c, 8)
    for key in ("train.steps", "train.log_every", "mesh.data"):
        assert f"config.{key}=" in str(err.value)


def test_clap_stage_lists_must_match():
    c = clap_tiny.get_config()
    check_settings(c, 1)
    c.model.audio.num_heads = (2, 4, 8)
    with pytest.raises(SettingsError, match=r"config.model.audio.depths=\(2, 2\) and config.model.audio.num_heads="
                                            r"\(2, 4, 8\)"):
        check_settings(c, 1)


def test_a_schedule_shorter_than_the_run_is_only_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="jaxaudio.train.settings"):
        check_settings(_config(**{"train.steps": 100, "optim.total_steps": 40}), 1)
        check_settings(_config(**{"train.steps": 100, "optim.total_steps": 0}), 1)  # 0: follows train.steps
    assert [r.getMessage() for r in caplog.records] == [
        "config.optim.total_steps=40 < config.train.steps=100: the learning rate reaches its end value at step 40 "
        "and stays there"]
