"""Whisper encoder: parity with transformers, conversion from Hugging Face, shapes, bad input.

Tiny `WhisperConfig`s with random weights (re-drawn at O(1) scale so attention is not
near-uniform) are `save_pretrained` into tmp dirs and converted with `convert_hf`: the
full-window models (80 and 128 mels, 1500 positions, 3000 frames) are compared with
`model.get_encoder()` on the extractor's features; a small bare `WhisperEncoder` (16
positions) serves the shape, option and bad-input tests. Parity: fp32, max abs error
<= 1e-4 (measured 2e-6 .. 3.5e-6 on outputs of magnitude ~4).
"""
import functools
import json
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperModel)
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder
from transformers.models.whisper.modeling_whisper import sinusoids as hf_sinusoids

from jaxaudio.convert import ConversionError, convert
from jaxaudio.convert.hf import convert_hf, load_pretrained
from jaxaudio.convert.whisper import build, config_from_hf, key_map
from jaxaudio.layers import DEFAULT_RULES
from jaxaudio.models.whisper import WhisperEncoder, sinusoids
from launch.convert import run_hf

TOL = 1e-4
SR = 16000


def _hf_config(num_mel_bins=80, max_source_positions=1500, **over) -> WhisperConfig:
    kw = dict(num_mel_bins=num_mel_bins, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
              decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, vocab_size=128,
              max_target_positions=32, max_source_positions=max_source_positions, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, decoder_start_token_id=1)
    return WhisperConfig(**(kw | over))


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("embed_positions.weight"):
                p.copy_(0.5 * noise)  # not sinusoids: the loaded table must be the one used
            elif p.ndim == 1 and "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
    return model.eval()


def _save(model: torch.nn.Module, directory) -> str:
    model.save_pretrained(str(directory))
    return str(directory)


def _features(n_mels: int) -> np.ndarray:
    """The extractor's features of a 1 s noise clip and a 3 s chirp: `[2, n_mels, 3000]`."""
    rng = np.random.default_rng(1)
    t = np.arange(3 * SR) / SR
    clips = [0.1 * rng.standard_normal(SR).astype(np.float32),
             (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)]
    return WhisperFeatureExtractor(feature_size=n_mels)(clips, sampling_rate=SR, return_tensors="np")["input_features"]


@functools.lru_cache(maxsize=None)
def _forward(model: WhisperEncoder):
    return jax.jit(lambda v, x: model.apply(v, x))


def _hf_encode(hf_model, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model.get_encoder()(torch.from_numpy(features)).last_hidden_state.numpy()


def _check_parity(directory: str, hf_model, features: np.ndarray, expect_kwargs: dict):
    variables, config = convert_hf(directory)
    assert config["model"] == "whisper" and config["kwargs"] == expect_kwargs
    model, _ = build(config["kwargs"])
    ours = np.asarray(_forward(model)(variables, jnp.asarray(features)))
    ref = _hf_encode(hf_model, features)
    assert ours.shape == ref.shape
    err = float(np.abs(ours - ref).max())
    assert err <= TOL, f"max abs error {err:.3g} > tolerance {TOL}"
    assert np.std(ref) > 0.1  # not a degenerate forward
    return model, variables, ours


@pytest.fixture(scope="module")
def full80(tmp_path_factory):
    """WhisperForConditionalGeneration (keys `model.encoder.*`), 80 mels, 1500 positions."""
    hf = _randomize(WhisperForConditionalGeneration(_hf_config()), seed=0)
    return hf, _save(hf, tmp_path_factory.mktemp("whisper80"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A bare WhisperEncoder (keys without prefix), 80 mels, 16 positions: 32 frames."""
    hf = _randomize(HFWhisperEncoder(_hf_config(max_source_positions=16)), seed=2)
    directory = _save(hf, tmp_path_factory.mktemp("whisper_small"))
    variables, config = convert_hf(directory)
    return hf, directory, build(config["kwargs"])[0], variables


KWARGS = dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
              max_source_positions=1500, activation="gelu")


def test_parity_for_conditional_generation_80_mels(full80):
    hf, directory = full80
    _check_parity(directory, hf, _features(80), KWARGS)


def test_parity_whisper_model_128_mels(tmp_path):
    """large-v3 style: 128 mel bins, `WhisperModel` keys (`encoder.*`)."""
    hf = _randomize(WhisperModel(_hf_config(num_mel_bins=128)), seed=1)
    _check_parity(_save(hf, tmp_path), hf, _features(128), KWARGS | {"num_mel_bins": 128})


def test_parity_bare_encoder(small):
    hf, directory, _, _ = small
    x = np.random.default_rng(0).standard_normal((2, 80, 32)).astype(np.float32)
    _check_parity(directory, hf, x, KWARGS | {"max_source_positions": 16})


def test_launcher_end_to_end(full80, tmp_path):
    hf, directory = full80
    summary = run_hf(directory, str(tmp_path / "converted"))
    assert summary["model"] == "whisper" and summary["source_tensors"] == len(
        [k for k in hf.state_dict() if k != "proj_out.weight"])  # proj_out is tied, not saved
    model, variables = load_pretrained(str(tmp_path / "converted"))
    assert model == WhisperEncoder(**KWARGS)
    features = _features(80)
    ours = np.asarray(_forward(model)(variables, jnp.asarray(features)))
    err = float(np.abs(ours - _hf_encode(hf, features)).max())
    assert err <= TOL, f"after launch.convert + load_pretrained: max abs error {err:.3g} > tolerance {TOL}"


def test_fresh_positions_are_whispers_sinusoids():
    # Whisper computes the angles (up to 1499 rad) in float32, ours in float64: float32's
    # spacing there is 1.2e-4, so the tables differ by up to ~1e-4 at the far positions.
    for channels in (64, 1280):
        err = np.abs(sinusoids(1500, channels) - hf_sinusoids(1500, channels).numpy()).max()
        assert err <= 2e-4, f"sinusoids(1500, {channels}): max abs error {err:.3g} > 2e-4"
    # A fresh model's table, both sides (no layers: only the stem is initialised).
    fresh = HFWhisperEncoder(_hf_config(max_source_positions=16, encoder_layers=0))
    model = WhisperEncoder(**(KWARGS | {"max_source_positions": 16, "encoder_layers": 0}))
    init = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 80, 32))))
    assert init["params"]["embed_positions"].shape == (16, 64)
    np.testing.assert_allclose(init["params"]["embed_positions"], fresh.embed_positions.weight.detach().numpy(),
                               atol=1e-5, rtol=0)


def test_every_parameter_has_logical_axes(small):
    _, _, model, _ = small
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 80, 8)))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    known = {name for name, _ in DEFAULT_RULES}
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert set(leaf.names) <= known and len(leaf.names) == leaf.value.ndim, leaf.names


@pytest.mark.parametrize("frames,out,jit", [(32, 16, True), (20, 10, True), (9, 5, True), (20, 10, False)])
def test_shapes_with_fewer_frames(small, frames, out, jit):
    _, _, model, variables = small
    x = jnp.asarray(np.random.default_rng(frames).standard_normal((2, 80, frames)), jnp.float32)
    y = (_forward(model) if jit else model.apply)(variables, x)
    chex.assert_shape(y, (2, out, 64))
    chex.assert_type(y, jnp.float32)
    chex.assert_tree_all_finite(y)


def test_fewer_frames_use_the_first_positions(small):
    """Our encoder on 20 frames equals HF's run with its position table cut to 10 rows."""
    hf, _, model, variables = small
    x = np.random.default_rng(5).standard_normal((1, 80, 20)).astype(np.float32)
    ours = np.asarray(_forward(model)(variables, jnp.asarray(x)))
    cut = HFWhisperEncoder(_hf_config(max_source_positions=10)).eval()
    state = {k: (v[:10] if k == "embed_positions.weight" else v) for k, v in hf.state_dict().items()}
    cut.load_state_dict(state)
    err = float(np.abs(ours - _hf_encode(cut, x)).max())
    assert err <= TOL, f"max abs error {err:.3g} > tolerance {TOL}"


def test_bfloat16_compute(small):
    _, _, model, variables = small
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 80, 32)), jnp.float32)
    want = np.asarray(_forward(model)(variables, x))
    y = _forward(model.clone(dtype=jnp.bfloat16))(variables, x)
    chex.assert_type(y, jnp.bfloat16)
    chex.assert_shape(y, (2, 16, 64))
    chex.assert_tree_all_finite(y)
    err = float(np.abs(np.asarray(y, np.float32) - want).max())
    assert err < 0.1, f"bf16 vs fp32: max abs error {err:.3g} >= 0.1"  # measured 0.036 on outputs up to 3.4


def test_remat_gives_the_same_loss_and_gradients(small):
    # One layer of the converted encoder keeps the two gradient compiles short.
    _, _, two_layers, converted = small
    model = two_layers.clone(encoder_layers=1)
    variables = {"params": {k: v for k, v in converted["params"].items() if k != "layers_1"}}
    x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 80, 8)), jnp.float32)
    remat = model.clone(remat=True)

    def loss(m):
        return lambda v: jnp.sum(m.apply(v, x) ** 2)

    l_ref, g_ref = jax.jit(jax.value_and_grad(loss(model)))(variables)
    l_remat, g_remat = jax.jit(jax.value_and_grad(loss(remat)))(variables)
    np.testing.assert_allclose(l_remat, l_ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bad_feature_shapes_are_refused(small):
    _, _, model, variables = small
    with pytest.raises(ValueError, match=r"34 frames exceed 2 \* max_source_positions = 32"):
        model.apply(variables, jnp.zeros((1, 80, 34)))
    with pytest.raises(ValueError, match=r"log-mel \[batch, 80, frames\]"):
        model.apply(variables, jnp.zeros((1, 128, 32)))


def _with_config(src: str, dst, **change) -> str:
    """A copy of checkpoint `src` whose config.json has `change` applied (None deletes the field)."""
    shutil.copytree(src, dst)
    path = dst / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in change.items():
        if v is None:
            del cfg[k]
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))
    return str(dst)


def test_config_with_another_d_model_lists_the_mis_shaped_keys(small, tmp_path):
    _, directory, _, _ = small
    with pytest.raises(ConversionError) as info:
        convert_hf(_with_config(directory, tmp_path / "ckpt", d_model=32))
    msg = str(info.value)
    assert "mis-shaped tensors" in msg, msg
    for line in ("conv1.weight (64, 80, 3) -> params/conv1/kernel expects (3, 80, 32)",
                 "embed_positions.weight (16, 64) -> params/embed_positions expects (16, 32)",
                 "layers.1.self_attn.q_proj.weight (64, 64) -> params/layers_1/attn/query/kernel expects (32, 4, 8)",
                 "layer_norm.weight (64,) -> params/layer_norm/scale expects (32,)"):
        assert line in msg, line
    assert "missing" not in msg and "unexpected" not in msg, msg


def test_config_with_another_layer_count_is_refused(small, tmp_path):
    _, directory, _, _ = small
    with pytest.raises(ConversionError) as info:
        convert_hf(_with_config(directory, tmp_path / "deeper", encoder_layers=3))
    msg = str(info.value)
    assert "15 missing variables" in msg and "params/layers_2/attn/key/kernel (64, 4, 16)" in msg, msg
    assert "layers_1" not in msg and "unexpected" not in msg, msg
    with pytest.raises(ConversionError) as info:
        convert_hf(_with_config(directory, tmp_path / "shallower", encoder_layers=1))
    msg = str(info.value)
    assert "15 unexpected keys" in msg and "layers.1.fc2.bias" in msg and "layers.0." not in msg, msg


@pytest.mark.parametrize("field", ["d_model", "encoder_layers", "num_mel_bins", "activation_function"])
def test_missing_config_field_is_named(small, tmp_path, field):
    _, directory, _, _ = small
    with pytest.raises(ConversionError, match=f"field '{field}' is missing"):
        convert_hf(_with_config(directory, tmp_path / "ckpt", **{field: None}))


def test_unsupported_activation_is_named():
    hf = _hf_config().to_dict() | {"activation_function": "mish"}
    with pytest.raises(ConversionError, match="activation_function='mish' is not supported"):
        config_from_hf(hf)
    assert config_from_hf(hf | {"activation_function": "gelu_new"})["activation"] == "gelu_tanh"


def test_decoder_and_proj_out_are_ignored_but_a_key_bias_is_not(small):
    hf, _, model, variables = small
    sd = {f"model.encoder.{k}": v.numpy() for k, v in hf.state_dict().items()}
    extra = {"proj_out.weight": np.zeros((128, 64), np.float32),
             "model.decoder.layers.0.fc1.weight": np.zeros((128, 64), np.float32),
             "decoder.embed_tokens.weight": np.zeros((128, 64), np.float32)}
    expected = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 80, 4))))
    got = convert(sd | extra, key_map(model), expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ConversionError, match=r"1 unexpected keys.*\n.*layers\.0\.self_attn\.k_proj\.bias"):
        convert(sd | {"model.encoder.layers.0.self_attn.k_proj.bias": np.zeros(64, np.float32)},
                key_map(model), expected)
