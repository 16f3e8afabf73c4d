"""A run changes layer layout between restarts (`--config.model.llm.scan_layers`): the tiny
BAT trained 2 steps unrolled resumes scanned (its checkpoint converted as it loads) and
ends where the uninterrupted unrolled run ends; the scanned run's checkpoint then restores
into an unrolled model, loads as a next stage and evaluates alike."""
import jax
import numpy as np
import pytest

from configs import bat_tiny
from jaxaudio.convert.engine import flatten
from jaxaudio.layers.scan import relayout
from jaxaudio.train.loop import Trainer, load_run_variables

from launch_util import override
from test_launch_bat import MICRO


def _config(data, steps, scan, **extra):
    # LoRA dropout 0: a scan draws each layer's dropout key differently from the unrolled loop.
    return override(bat_tiny.get_config("1"), {
        **MICRO, "data.root": data, "model.llm.num_hidden_layers": 2, "model.llm.scan_layers": scan,
        "model.lora.dropout": 0.0, "train.steps": steps, "train.log_every": 1, "train.checkpoint_every": 2,
        "train.eval_every": 0, "train.batch_size": 8, "train.eval_batch_size": 8,
        "data.num_train": 16, "data.num_eval": 8, **extra})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scan_layout")
    data = str(tmp / "data")
    straight = Trainer(_config(data, 4, False), str(tmp / "straight"))
    straight.train()
    Trainer(_config(data, 2, False), str(tmp / "switch")).train()
    switched = Trainer(_config(data, 4, True), str(tmp / "switch"))
    switched.train()
    return data, tmp, straight, switched


def test_resumes_in_the_other_layout(runs):
    _, _, straight, switched = runs
    assert [h["step"] for h in switched.history] == [3, 4]  # resumed, not restarted
    want = {h["step"]: h["loss"] for h in straight.history}
    for h in switched.history:
        np.testing.assert_allclose(h["loss"], want[h["step"]], rtol=2e-5)
    params = flatten(jax.device_get(switched.state.params))
    assert params["llm/layers/attn/query/lora_a"].shape[0] == 2
    plain = flatten(jax.device_get(straight.state.params))
    for k, v in relayout(params, plain.keys()).items():
        np.testing.assert_allclose(v, plain[k], atol=2e-6, err_msg=k)


def test_scanned_run_loads_unrolled(runs):
    data, tmp, _, switched = runs
    back = Trainer(_config(data, 4, False), str(tmp / "switch"))
    assert back.restore_or_init() == 4
    unrolled = flatten(jax.device_get(back.state.params))
    assert "llm/layers_1/attn/query/lora_a" in unrolled
    scanned = flatten(jax.device_get(switched.state.params))
    for k, v in relayout(scanned, unrolled.keys()).items():
        np.testing.assert_array_equal(v, unrolled[k], err_msg=k)
    assert back.evaluate() == pytest.approx(switched.evaluate(), abs=1e-6)
    # A next stage from the scanned run, unrolled, and load_run_variables keeps the saved layout.
    stage = Trainer(_config(data, 1, False, **{"init.checkpoint": str(tmp / "switch")}), str(tmp / "next"))
    np.testing.assert_array_equal(flatten(jax.device_get(stage.state.params))["llm/layers_1/mlp/up/kernel"],
                                  unrolled["llm/layers_1/mlp/up/kernel"])
    assert "params/llm/layers/mlp/up/kernel" in flatten(load_run_variables(str(tmp / "switch")))
