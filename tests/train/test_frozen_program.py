"""The compiled train step materialises nothing parameter-sized for frozen parameters (fp32,
bf16 or int8-stored): no weight gradient, no zero update, no NaN-guard copy — only the forward
reads them (checked in XLA's optimised program, by the shapes only those parameters have)."""
import re

import flax.linen as nn
import jax
import pytest

from jaxaudio.convert import flatten
from jaxaudio.layers.dense import abstract_init
from jaxaudio.layers.partitioning import DEFAULT_RULES
from jaxaudio.tasks import get_task
from jaxaudio.train.loop import make_train_step
from jaxaudio.train.mesh import batch_sharding, make_mesh
from jaxaudio.train.optim import make_optimizer, resolve_total_steps, storage_dtypes, trainable_mask
from jaxaudio.train.state import abstract_train_state
from train.fixtures import make_clips, tiny_config

TRAINS = r"(head|distance_head|azimuth_head|elevation_head)/.*"


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("clips"))
    make_clips(root)
    c = tiny_config(root, 2)
    c.model.embed_dim = 48  # block kernels [48, 3, 2, 24], [48, 96], [96, 48]: no activation has these shapes
    c.optim.trainable = TRAINS
    resolve_total_steps(c)
    task = get_task(c.task)(c)
    abstract, dense_kernels = abstract_init(task.init_variables, jax.random.PRNGKey(0))
    params = nn.unbox(abstract)["params"]
    tx, _ = make_optimizer(c.optim, params, task.layer_scale)
    mesh = make_mesh({"data": 1})
    data = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data) for k, v in task.batch_spec(8).items()}

    def compiled(mask, storage=None):
        with c.unlocked():
            c.optim.frozen_storage = storage or {}
        st, sh = abstract_train_state(task.init_variables, tx, jax.random.PRNGKey(0), mesh, DEFAULT_RULES,
                                      storage_dtypes(c.optim, params, dense_kernels))
        fn = make_train_step(task, tx, 1, True, mask)
        with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
            return jax.jit(fn, in_shardings=(sh, data), out_shardings=(sh, None), donate_argnums=0).lower(
                st, batch).compile().as_text()
    shapes = {k: v.shape for k, v in flatten(params).items() if "blocks_0" in k and k.endswith("kernel")}
    return compiled, trainable_mask(c.optim, params), shapes


def _outside_forward(hlo: str, shape: tuple) -> list[str]:
    """Instructions producing an f32, bf16 or s8 array of `shape` that are not the model's forward."""
    dims = "[" + ",".join(map(str, shape)) + "]{"
    found = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(ROOT )?%\S+ = (\S+) ", line)
        if not m or not m.group(2).startswith(("f32" + dims, "bf16" + dims, "s8" + dims)):
            continue
        name = re.search(r'op_name="([^"]*)"', line)
        if name and "jvp(" in name.group(1) and "transpose(" not in name.group(1):
            continue  # the forward reads the frozen weight
        if re.search(r"= \S+ (parameter|bitcast|get-tuple-element|tuple)\(", line):
            continue  # the buffer itself, passed through
        found.append(line.strip()[:200])
    return found


def test_frozen_parameters_only_feed_the_forward(program):
    compiled, mask, shapes = program
    hlo = compiled(mask)
    assert len(shapes) >= 3
    for name, shape in shapes.items():
        assert _outside_forward(hlo, shape) == [], name


def test_frozen_parameters_in_bf16_only_feed_the_forward(program):
    compiled, mask, shapes = program
    hlo = compiled(mask, {"blocks_0": "bfloat16"})
    assert "bf16[144,48]" in hlo and "bf16[48,96]" in hlo  # qkv (output-major) and fc1, stored in bf16
    for name, shape in {**shapes, "blocks_0/attn/qkv/kernel (stored q)": (144, 48)}.items():
        assert _outside_forward(hlo, shape) == [], name


def test_frozen_parameters_in_int8_only_feed_the_forward(program):
    """int8 kernels: the forward dequantises them (a convert in the forward); nothing else
    kernel-shaped, not even an int8 zero update or NaN-guard select."""
    compiled, mask, shapes = program
    hlo = compiled(mask, {"blocks_0": "int8"})
    # The qkv kernel is stored output-major (`[3 * heads * head_dim, embed]`), the out kernel as it is.
    assert "s8[144,48]" in hlo and "s8[2,24,48]" in hlo
    for name, shape in {**shapes, "blocks_0/attn/qkv/kernel (stored q)": (144, 48)}.items():
        assert _outside_forward(hlo, shape) == [], name


@pytest.mark.parametrize("storage", [None, {"blocks_0": "int8"}])
def test_the_check_sees_weight_gradients_when_nothing_stops_them(program, storage):
    """Without the trainable mask in the step (the optimizer alone zeroes frozen updates) XLA
    computes the frozen weights' gradients (int8: the backward through the blocks, which
    dequantises their kernels again): the same check finds them."""
    compiled, _, shapes = program
    hlo = compiled(None, storage)
    assert any(_outside_forward(hlo, shape) for shape in shapes.values())
