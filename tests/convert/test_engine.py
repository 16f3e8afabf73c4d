"""The conversion engine (`convert`) and checkpoint io on a small fake model."""
import argparse
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from jaxaudio.convert import (ConversionError, Ignore, KeyMap, Rule, convert, flatten, load_converted,
                              load_state_dict, save_converted, unflatten)
from jaxaudio.convert.engine import conv2d, linear
from jaxaudio.layers import BatchNorm


class Fake(nn.Module):
    """conv 2x2 (1 -> 2 channels) -> BatchNorm -> flatten -> Dense 8 -> 3 -> Dense per layer."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(2, (2, 2), padding="VALID", use_bias=False, name="conv")(x)  # [b, 2, 2, 2]
        x = BatchNorm(affine=False, name="bn")(x, train)
        x = nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))
        for i in range(2):
            x = nn.Dense(3, use_bias=False, name=f"layers_{i}")(x)
        return x


MODEL = Fake()
X = np.random.default_rng(0).standard_normal((2, 3, 3, 1)).astype(np.float32)
WINDOW = np.hanning(5).astype(np.float32)


def _expected():
    return nn.unbox(jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), jnp.asarray(X)))


def _key_map() -> KeyMap:
    def same_window(x):
        return None if np.allclose(x, WINDOW, atol=1e-6) else f"window differs by {np.max(np.abs(x - WINDOW)):.3g}"
    return KeyMap(
        rules=[
            Rule(r"conv\.weight", "params/conv/kernel", conv2d),
            Rule(r"bn\.running_mean", "batch_stats/bn/mean"),
            Rule(r"bn\.running_var", "batch_stats/bn/var"),
            Rule(r"fc\.weight", "params/fc/kernel", linear),
            Rule(r"fc\.bias", "params/fc/bias"),
            Rule(r"legacy_fc\.weight", "params/fc/kernel", linear),
            Rule(r"layers\.(\d+)\.weight", r"params/layers_\1/kernel", linear),
        ],
        ignore=[
            Ignore(r".*num_batches_tracked", "step counter"),
            Ignore(r"window", "recomputed", same_window),
        ])


def _state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((2, 1, 2, 2)),  # float64 on purpose: comes out float32
        "bn.running_mean": rng.standard_normal(2).astype(np.float32),
        "bn.running_var": rng.uniform(0.5, 2, 2).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "fc.weight": rng.standard_normal((3, 8)).astype(np.float32),
        "fc.bias": rng.standard_normal(3).astype(np.float32),
        "layers.0.weight": rng.standard_normal((3, 3)).astype(np.float32),
        "layers.1.weight": rng.standard_normal((3, 3)).astype(np.float32),
        "window": WINDOW.copy(),
    }


# --- engine -------------------------------------------------------------------------------

def test_convert_success_maps_values_and_matches_the_tree():
    sd = _state_dict()
    out = convert(sd, _key_map(), _expected())
    expected = _expected()
    assert jax.tree.structure(out) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(expected)):
        assert a.shape == b.shape and a.dtype == np.float32, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(out["params"]["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(out["params"]["layers_1"]["kernel"], sd["layers.1.weight"].T)
    np.testing.assert_array_equal(out["params"]["conv"]["kernel"],
                                  sd["conv.weight"].transpose(2, 3, 1, 0).astype(np.float32))
    np.testing.assert_array_equal(out["batch_stats"]["bn"]["var"], sd["bn.running_var"])
    # The converted tree runs the model, and equals the same computation in torch.
    y = np.asarray(MODEL.apply(out, jnp.asarray(X)))
    t = torch.nn.functional.conv2d(torch.from_numpy(X.transpose(0, 3, 1, 2)), torch.from_numpy(sd["conv.weight"]).float())
    t = (t - torch.from_numpy(sd["bn.running_mean"])[:, None, None]) / torch.sqrt(
        torch.from_numpy(sd["bn.running_var"])[:, None, None] + 1e-5)
    t = t.permute(0, 2, 3, 1).reshape(2, -1) @ torch.from_numpy(sd["fc.weight"]).T + torch.from_numpy(sd["fc.bias"])
    for i in range(2):
        t = t @ torch.from_numpy(sd[f"layers.{i}.weight"]).T
    np.testing.assert_allclose(y, t.numpy(), atol=1e-5)


def test_convert_casts_floats_to_the_requested_dtype():
    out = convert(_state_dict(), _key_map(), _expected(), dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(out)} == {jnp.dtype(jnp.bfloat16)}


def test_convert_reports_every_problem_in_one_message():
    sd = _state_dict()
    del sd["fc.bias"]                                    # missing variable
    sd["decoder.weight"] = np.zeros((4, 4), np.float32)  # no rule
    sd["layers.5.weight"] = np.zeros((3, 3), np.float32)  # rule, but no such variable
    sd["conv.weight"] = np.zeros((2, 1, 3, 3))           # mis-shaped
    sd["window"] = WINDOW + 0.5                          # failed Ignore check
    sd["legacy_fc.weight"] = sd["fc.weight"]             # second key for the same target
    with pytest.raises(ConversionError) as info:
        convert(sd, _key_map(), _expected(), source_name="fake.pth")
    msg = str(info.value)
    assert msg.startswith("cannot convert fake.pth:")
    expected_lines = [
        "2 unexpected keys (no rule maps them)",
        "decoder.weight (4, 4)",
        "layers.5.weight -> params/layers_5/kernel (no such variable in the model)",
        "1 missing variables (no key fills them)",
        "params/fc/bias (3,)",
        "1 mis-shaped tensors",
        "conv.weight (2, 1, 3, 3) -> params/conv/kernel expects (2, 2, 1, 2)",
        "1 keys mapped twice",
        "legacy_fc.weight -> params/fc/kernel",
        "1 failed checks",
        "window: window differs by 0.5",
    ]
    for line in expected_lines:
        assert line in msg, f"{line!r} not in:\n{msg}"
    # Nothing else is blamed: the ignored counter and the well-formed keys are not listed.
    for ok in ("num_batches_tracked", "bn.running_mean", "layers.0.weight", "params/layers_0", "batch_stats"):
        assert ok not in msg, ok


def test_convert_ignore_without_check_drops_any_value():
    sd = _state_dict()
    sd["bn.num_batches_tracked"] = np.array([1, 2, 3])
    convert(sd, _key_map(), _expected())


def test_convert_long_lists_are_truncated():
    sd = _state_dict()
    sd.update({f"junk.{i}": np.zeros(1, np.float32) for i in range(45)})
    with pytest.raises(ConversionError, match=r"(?s)45 unexpected keys.*junk\.44 \(1,\)\n    \.\.\. and 5 more$"):
        convert(sd, _key_map(), _expected())


def test_flatten_unflatten_round_trip():
    tree = {"params": {"a": {"kernel": np.ones(2)}, "b": np.zeros(1)}, "batch_stats": {"bn": {"mean": np.ones(3)}}}
    flat = flatten(tree)
    assert set(flat) == {"params/a/kernel", "params/b", "batch_stats/bn/mean"}
    assert jax.tree.structure(unflatten(flat)) == jax.tree.structure(tree)


# --- io -----------------------------------------------------------------------------------

def _float32_sd(seed: int = 0) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v for k, v in _state_dict(seed).items()}


def _assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert a[k].dtype == b[k].dtype, k


def test_load_safetensors_file_and_directory(tmp_path):
    sd = _float32_sd()
    save_file(sd, str(tmp_path / "model.safetensors"))
    _assert_same(load_state_dict(str(tmp_path / "model.safetensors")), sd)
    _assert_same(load_state_dict(str(tmp_path)), sd)
    # ... and it converts.
    convert(load_state_dict(str(tmp_path)), _key_map(), _expected())


def test_load_sharded_safetensors(tmp_path):
    sd = _float32_sd()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:4], "model-00002-of-00002.safetensors": keys[4:]}
    for name, names in shards.items():
        save_file({k: sd[k] for k in names}, str(tmp_path / name))
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_same(load_state_dict(str(tmp_path)), sd)
    _assert_same(load_state_dict(str(tmp_path / "model.safetensors.index.json")), sd)


def test_load_torch_checkpoint_with_model_entry(tmp_path):
    sd = _float32_sd()
    path = str(tmp_path / "finetuned.pth")
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 3}, path)
    loaded = load_state_dict(path)
    _assert_same(loaded, sd)
    assert all(isinstance(v, np.ndarray) for v in loaded.values())
    _assert_same(load_state_dict(path, state_key="model"), sd)
    with pytest.raises(ConversionError, match="has no entry 'ema'"):
        load_state_dict(path, state_key="ema")


def test_load_torch_nested_dicts_are_flattened(tmp_path):
    path = str(tmp_path / "nested.pt")
    torch.save({"encoder": {"fc": {"weight": torch.ones(2, 3)}}, "head.bias": torch.zeros(2)}, path)
    loaded = load_state_dict(path)
    assert set(loaded) == {"encoder.fc.weight", "head.bias"}


def test_pickled_objects_need_allow_pickle(tmp_path):
    sd = _float32_sd()
    path = str(tmp_path / "checkpoint-99.pth")
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 99,
                "args": argparse.Namespace(batch_size=64, blr=1e-3)}, path)
    with pytest.raises(ConversionError) as info:
        load_state_dict(path)
    assert "--allow_pickle" in str(info.value) and path in str(info.value)
    _assert_same(load_state_dict(path, allow_pickle=True), sd)


def test_non_tensor_entries_name_the_key(tmp_path):
    path = str(tmp_path / "mixed.pth")
    torch.save({"weights": {"a": torch.ones(1)}, "epoch": 3}, path)
    with pytest.raises(ConversionError, match="entry 'epoch' is a int, not a tensor"):
        load_state_dict(path)
    assert set(load_state_dict(path, state_key="weights")) == {"a"}


def test_bf16_and_fp16_torch_tensors_come_out_float32(tmp_path):
    path = str(tmp_path / "pytorch_model.bin")
    w = torch.randn(4, 5)
    torch.save({"w": w.to(torch.bfloat16), "h": w.to(torch.float16), "i": torch.arange(3)}, path)
    loaded = load_state_dict(str(tmp_path))
    assert loaded["w"].dtype == np.float32 and loaded["h"].dtype == np.float32
    np.testing.assert_array_equal(loaded["w"], w.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(loaded["h"], w.to(torch.float16).float().numpy())
    assert loaded["i"].dtype == np.int64


def test_directory_without_weights_is_an_error(tmp_path):
    (tmp_path / "README.md").write_text("no weights here")
    with pytest.raises(ConversionError) as info:
        load_state_dict(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "no weights file" in str(info.value)
    with pytest.raises(ConversionError, match="no such file or directory"):
        load_state_dict(str(tmp_path / "missing.safetensors"))


def test_directory_with_two_candidates_is_ambiguous(tmp_path):
    for name in ("a.pth", "b.pth"):
        torch.save({"w": torch.ones(1)}, str(tmp_path / name))
    with pytest.raises(ConversionError, match=r"found \['a.pth', 'b.pth'\]"):
        load_state_dict(str(tmp_path))


def test_unknown_suffix_is_an_error(tmp_path):
    path = tmp_path / "weights.npz"
    np.savez(path, w=np.ones(2))
    with pytest.raises(ConversionError, match="unknown checkpoint format"):
        load_state_dict(str(path))


def test_save_and_load_converted_round_trip(tmp_path):
    variables = convert(_state_dict(), _key_map(), _expected())
    config = {"depth": 2, "dtype": "float32", "name": "fake"}
    save_converted(str(tmp_path / "out"), variables, config)
    assert os.path.exists(tmp_path / "out" / "config.json")
    restored, restored_config = load_converted(str(tmp_path / "out"))
    assert restored_config == config
    assert jax.tree.structure(restored) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(np.asarray(a), b)
        assert np.asarray(a).dtype == b.dtype
    # Saving again over the same directory replaces it.
    save_converted(str(tmp_path / "out"), jax.tree.map(lambda a: a * 0, variables), config)
    again, _ = load_converted(str(tmp_path / "out"))
    assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(again))


def test_load_converted_needs_config(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        load_converted(str(tmp_path))


def test_merge_folds_several_keys_and_reports_incomplete_groups():
    """`Merge` builds one tensor from parts (weight norm's g and v) before the rules map it."""
    from jaxaudio.convert import Merge
    km = KeyMap(rules=[Rule(r"(a|b)\.weight", r"params/\1/kernel")],
                merge=[Merge(r"(a|b)\.weight_(?P<part>g|v)", r"\1.weight", ("g", "v"),
                             lambda p: p["g"] * p["v"])])
    expected = {"params": {"a": {"kernel": np.zeros((2,))}, "b": {"kernel": np.zeros((2,))}}}
    sd = {"a.weight_g": np.array([2.0, 3.0]), "a.weight_v": np.array([1.0, -1.0]),
          "b.weight_g": np.array([1.0, 1.0]), "b.weight_v": np.array([4.0, 5.0])}
    out = convert(sd, km, expected)
    np.testing.assert_array_equal(out["params"]["a"]["kernel"], [2.0, -3.0])
    np.testing.assert_array_equal(out["params"]["b"]["kernel"], [4.0, 5.0])
    del sd["b.weight_v"]
    with pytest.raises(ConversionError, match=r"b\.weight: needs \['g', 'v'\], the checkpoint has \['g'\]"):
        convert(sd, km, expected)


def test_ignored_tied_copies_must_equal_their_original():
    km = KeyMap(rules=[Rule(r"emb", "params/emb")],
                ignore=[Ignore(r"head\.(\d)", "tied", same_as=[r"missing\1", "emb"])])
    expected = {"params": {"emb": np.zeros((3,))}}
    convert({"emb": np.ones(3), "head.0": np.ones(3)}, km, expected)
    with pytest.raises(ConversionError, match="head.0: differs from emb"):
        convert({"emb": np.ones(3), "head.0": np.zeros(3)}, km, expected)
    with pytest.raises(ConversionError, match=r"tied to missing0 or emb, which the checkpoint does not hold"):
        convert({"head.0": np.ones(3)}, KeyMap(rules=[], ignore=km.ignore), {})
