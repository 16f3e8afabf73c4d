"""`optim.frozen_storage`: frozen parameters of a part kept in bf16, what trains in fp32 with
fp32 Adam moments; the run trains, saves and resumes with those dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaudio.convert import flatten
from jaxaudio.train.loop import Trainer
from train.fixtures import make_clips, tiny_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("clips"))
    make_clips(root)
    return root


def _config(root, steps):
    c = tiny_config(root, steps)
    c.optim.trainable = r"(head|distance_head|azimuth_head|elevation_head)/.*"
    c.optim.frozen_storage = "blocks_0=bfloat16, head=bfloat16"  # head trains: stays fp32
    c.optim.total_steps = 4
    return c


def test_frozen_part_in_bf16_trains_and_resumes(data_root, tmp_path):
    first = Trainer(_config(data_root, 2), str(tmp_path / "run"))
    params = flatten(jax.device_get(first.state.params))
    assert params["blocks_0/attn/qkv/kernel"].dtype == jnp.bfloat16
    assert params["head/kernel"].dtype == np.float32 and params["patch_embed/kernel"].dtype == np.float32
    # Adam's two moments exist for what trains only, in fp32.
    trains = sum(v.size for k, v in params.items() if k.split("/")[0].endswith("head"))
    moments = [x for x in jax.tree.leaves(first.state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * trains and all(x.dtype == np.float32 for x in moments)
    before = params["blocks_0/attn/qkv/kernel"]
    first.train()
    after = flatten(jax.device_get(first.state.params))
    np.testing.assert_array_equal(after["blocks_0/attn/qkv/kernel"], before)  # frozen, still bf16
    assert after["blocks_0/attn/qkv/kernel"].dtype == jnp.bfloat16
    assert not np.array_equal(after["head/kernel"], params["head/kernel"])
    assert all(np.isfinite(h["loss"]) for h in first.history)
    resumed = Trainer(_config(data_root, 4), str(tmp_path / "run"))
    resumed.train()
    final = flatten(jax.device_get(resumed.state.params))
    assert final["blocks_0/attn/qkv/kernel"].dtype == jnp.bfloat16 and int(resumed.state.step) == 4


def test_unknown_part_or_dtype_is_named(data_root, tmp_path):
    c = _config(data_root, 1)
    c.optim.frozen_storage = "llm=bfloat16"
    with pytest.raises(ValueError, match=r"frozen_storage: 'llm' is not a part of the model"):
        Trainer(c, str(tmp_path / "a"))
    c.optim.frozen_storage = "blocks_0:bfloat16"
    with pytest.raises(ValueError, match="write part=dtype"):
        Trainer(c, str(tmp_path / "c"))
    c.optim.frozen_storage = "blocks_0=int4"
    with pytest.raises(ValueError, match=r"frozen_storage\['blocks_0'\]='int4'"):
        Trainer(c, str(tmp_path / "b"))
