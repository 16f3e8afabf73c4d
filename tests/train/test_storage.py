"""`optim.frozen_storage`: frozen parameters of a part kept in bf16 (or int8 Dense kernels
with per-channel scales), what trains in fp32 with fp32 Adam moments; the run trains, saves
and resumes with those dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaudio.convert import flatten
from jaxaudio.layers import quant
from jaxaudio.layers.quant import QTensor, quantize
from jaxaudio.train.checkpoint import CheckpointMismatch, restore_run_variables
from jaxaudio.train import optim
from jaxaudio.train.loop import Trainer
from train.fixtures import make_clips, tiny_config

BLOCK_KERNELS = ("attn/qkv", "attn/out", "mlp/fc1", "mlp/fc2")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("clips"))
    make_clips(root)
    return root


def _config(root, steps, storage="blocks_0=bfloat16, head=bfloat16"):  # head trains: stays fp32
    c = tiny_config(root, steps)
    c.optim.trainable = r"(head|distance_head|azimuth_head|elevation_head)/.*"
    c.optim.frozen_storage = storage
    c.optim.total_steps = 4
    return c


def test_frozen_part_in_bf16_trains_and_resumes(data_root, tmp_path):
    first = Trainer(_config(data_root, 2), str(tmp_path / "run"))
    qkv = jax.device_get(first.state.params["blocks_0"]["attn"]["qkv"]["kernel"])
    # The per-head projection [embed, 3, heads, head_dim]: bf16, output-major, scales of 1.
    assert isinstance(qkv, QTensor) and qkv.output_major and qkv.q.dtype == jnp.bfloat16
    assert qkv.q.ndim == 2 and qkv.q.shape[1] == qkv.shape[0] and np.all(qkv.scale == 1)
    params = flatten(jax.device_get(first.state.params))
    assert params["blocks_0/mlp/fc1/kernel"].dtype == jnp.bfloat16  # the others as they are
    assert params["head/kernel"].dtype == np.float32 and params["patch_embed/kernel"].dtype == np.float32
    # Adam's two moments exist for what trains only, in fp32.
    trains = sum(v.size for k, v in params.items() if k.split("/")[0].endswith("head"))
    moments = [x for x in jax.tree.leaves(first.state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * trains and all(x.dtype == np.float32 for x in moments)
    before = params["blocks_0/mlp/fc1/kernel"]
    first.train()
    after = flatten(jax.device_get(first.state.params))
    np.testing.assert_array_equal(after["blocks_0/mlp/fc1/kernel"], before)  # frozen, still bf16
    assert after["blocks_0/mlp/fc1/kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(jax.device_get(first.state.params["blocks_0"]["attn"]["qkv"]["kernel"]).q, qkv.q)
    assert not np.array_equal(after["head/kernel"], params["head/kernel"])
    assert all(np.isfinite(h["loss"]) for h in first.history)
    resumed = Trainer(_config(data_root, 4), str(tmp_path / "run"))
    resumed.train()
    final = flatten(jax.device_get(resumed.state.params))
    assert final["blocks_0/mlp/fc1/kernel"].dtype == jnp.bfloat16 and int(resumed.state.step) == 4


def test_unknown_part_or_dtype_is_named(data_root, tmp_path):
    c = _config(data_root, 1)
    c.optim.frozen_storage = "llm=bfloat16"
    with pytest.raises(ValueError, match=r"frozen_storage: 'llm' is not a part of the model"):
        Trainer(c, str(tmp_path / "a"))
    c.optim.frozen_storage = "blocks_0:bfloat16"
    with pytest.raises(ValueError, match="write part=dtype"):
        Trainer(c, str(tmp_path / "c"))
    c.optim.frozen_storage = "blocks_0=int4"
    with pytest.raises(ValueError, match=r"frozen_storage\['blocks_0'\]='int4': choose one of .*'int8'"):
        Trainer(c, str(tmp_path / "b"))


@pytest.fixture(scope="module")
def fp32_run(data_root, tmp_path_factory):
    """The same run with every parameter in fp32: `(workdir, losses)`."""
    workdir = str(tmp_path_factory.mktemp("fp32") / "run")
    trainer = Trainer(_config(data_root, 2, storage=""), workdir)
    trainer.train()
    return workdir, [h["loss"] for h in trainer.history]


def test_frozen_part_in_int8_trains_resumes_and_reads_back(data_root, tmp_path, fp32_run):
    storage = "blocks_0=int8, head=int8"  # head trains: stays fp32
    first = Trainer(_config(data_root, 2, storage), str(tmp_path / "run"))
    params = first.state.params
    kernels = {k: params["blocks_0"][k.split("/")[0]][k.split("/")[1]]["kernel"] for k in BLOCK_KERNELS}
    for name, qt in kernels.items():
        assert isinstance(qt, QTensor) and qt.q.dtype == jnp.int8 and qt.scale.dtype == jnp.float32, name
    assert kernels["attn/out"].scale.shape == (1, 1, 32)  # [heads, head_dim, embed]: two input axes
    flat = flatten(jax.device_get(params))  # a QTensor's leaves: `kernel/.q`, `kernel/.scale`
    others = [k for k in flat if k.startswith("blocks_0/") and "/kernel/" not in k]
    assert others and all(flat[k].dtype == jnp.bfloat16 for k in others)
    assert flat["head/kernel"].dtype == np.float32 and flat["patch_embed/kernel"].dtype == np.float32
    trains = sum(v.size for k, v in flat.items() if k.split("/")[0].endswith("head"))
    moments = [x for x in jax.tree.leaves(first.state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * trains and all(x.dtype == np.float32 for x in moments)
    before = jax.device_get(kernels)

    first.train()
    losses = [h["loss"] for h in first.history]
    # int8 (error <= scale / 2 per weight) against fp32 storage, the same batches: measured
    # at most 3e-5 relative on losses ~65 (bf16 storage: 2e-5); 1e-3 leaves a wide margin.
    np.testing.assert_allclose(losses, fp32_run[1], rtol=1e-3)
    step, saved = restore_run_variables(str(tmp_path / "run"))
    saved = flatten(saved["params"])
    for name, qt in before.items():
        after = jax.device_get(first.state.params["blocks_0"][name.split("/")[0]][name.split("/")[1]]["kernel"])
        np.testing.assert_array_equal(after.q, qt.q)  # frozen: untouched
        np.testing.assert_array_equal(saved[f"blocks_0/{name}/kernel"], qt.dequantize(np.float32))
        assert saved[f"blocks_0/{name}/kernel"].dtype == np.float32
    assert step == 2

    resumed = Trainer(_config(data_root, 4, storage), str(tmp_path / "run"))
    resumed.train()
    assert int(resumed.state.step) == 4 and [h["step"] for h in resumed.history] == [3, 4]
    qkv = jax.device_get(resumed.state.params["blocks_0"]["attn"]["qkv"]["kernel"])
    np.testing.assert_array_equal(qkv.q, before["attn/qkv"].q)
    np.testing.assert_array_equal(qkv.scale, before["attn/qkv"].scale)
    metrics = resumed.evaluate()  # what launch/evaluate.py does with the restored int8 state
    assert metrics and all(np.isfinite(v) for v in metrics.values())
    # Evaluated without the run's storage setting: one error that names the setting.
    with pytest.raises(CheckpointMismatch, match=r"(?s)kernel/q: checkpoint .* pass the run's "
                                                 r"--config.optim.frozen_storage"):
        Trainer(_config(data_root, 4, ""), str(tmp_path / "run")).restore_or_init(move_damaged=False)


def test_int8_state_starts_from_a_float_run(data_root, tmp_path, fp32_run):
    """`init.checkpoint` (another run, float): the kernels are quantized as they load."""
    c = _config(data_root, 2, "blocks_0=int8")
    c.init.checkpoint = fp32_run[0]
    trainer = Trainer(c, str(tmp_path / "run"))
    loaded = flatten(restore_run_variables(fp32_run[0])[1]["params"])
    for name in BLOCK_KERNELS:
        qt = jax.device_get(trainer.state.params["blocks_0"][name.split("/")[0]][name.split("/")[1]]["kernel"])
        want = quantize(loaded[f"blocks_0/{name}/kernel"], qt.reduce_axes)
        np.testing.assert_array_equal(qt.q, want.q)
        np.testing.assert_array_equal(qt.scale, want.scale)
    np.testing.assert_array_equal(np.asarray(trainer.state.params["head"]["kernel"]), loaded["head/kernel"])


def test_a_run_saved_with_kernel_order_int8_resumes(data_root, tmp_path, monkeypatch):
    """Runs saved before per-head projections kept their int8 `q` output-major (`layers.quant`)
    hold it in kernel order: resuming turns it output-major, the same integers, and goes on."""
    storage = "blocks_0=int8"
    with monkeypatch.context() as m:
        m.setattr(quant, "output_major", lambda ndim, reduce_axes: False)  # the earlier layout
        old = Trainer(_config(data_root, 2, storage), str(tmp_path / "run"))
        old.train()
        old_qkv = jax.device_get(old.state.params["blocks_0"]["attn"]["qkv"]["kernel"])
    assert not old_qkv.output_major and old_qkv.q.ndim == 4  # [embed, 3, heads, head_dim]
    resumed = Trainer(_config(data_root, 4, storage), str(tmp_path / "run"))
    resumed.train()
    assert [h["step"] for h in resumed.history] == [3, 4]
    qkv = jax.device_get(resumed.state.params["blocks_0"]["attn"]["qkv"]["kernel"])
    assert qkv.output_major and qkv.q.shape == (np.prod(old_qkv.q.shape[1:]), old_qkv.q.shape[0])
    np.testing.assert_array_equal(qkv.q, old_qkv.q.reshape(old_qkv.q.shape[0], -1).T)
    np.testing.assert_array_equal(qkv.dequantize(np.float32), old_qkv.dequantize(np.float32))
    assert all(np.isfinite(h["loss"]) for h in resumed.history)


def test_a_run_saved_with_whole_bf16_kernels_resumes(data_root, tmp_path, monkeypatch):
    """Runs saved before bf16 per-head projections were kept output-major hold the plain
    kernel: resuming makes it the output-major `QTensor` (scales of 1), the same values."""
    with monkeypatch.context() as m:
        m.setattr(optim, "output_major", lambda ndim, reduce_axes: False)  # the earlier labels
        old = Trainer(_config(data_root, 2), str(tmp_path / "run"))
        old.train()
        kernel = np.asarray(jax.device_get(old.state.params["blocks_0"]["attn"]["qkv"]["kernel"]))
    assert kernel.dtype == jnp.bfloat16 and kernel.ndim == 4  # [embed, 3, heads, head_dim]
    resumed = Trainer(_config(data_root, 4), str(tmp_path / "run"))
    resumed.train()
    assert [h["step"] for h in resumed.history] == [3, 4]
    qkv = jax.device_get(resumed.state.params["blocks_0"]["attn"]["qkv"]["kernel"])
    assert qkv.output_major and qkv.q.dtype == jnp.bfloat16 and np.all(qkv.scale == 1)
    np.testing.assert_array_equal(qkv.dequantize(np.float32), kernel.astype(np.float32))
