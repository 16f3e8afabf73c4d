"""Spatial-AST on a tiny config: shapes (chex) with and without jit, train-mode behaviour,
input errors, the sin-cos position embedding and the loss against torch.

The jitted functions are built once per module (`functools.lru_cache`): compiles are the
slow part on a 2-core CPU.
"""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxaudio.models.spatial_ast import BinauralFrontend, SpatialAST, sincos_pos_embed_2d, smoothed_bins, spatial_ast_loss

MODEL = SpatialAST(n_mels=32, target_frames=64, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2,
                   num_classes=5, time_mask=16, freq_mask=8)
BATCH, SAMPLES = 2, 16000  # 0.5 s at 32 kHz: 51 STFT frames, resized to 64
GRID_T, GRID_F = 64 // 8, 32 // 8
KEEP_T, KEEP_F = 6, 3  # int(8 * 0.75), int(4 * 0.75)
HEAD_SHAPES = {"classifier": (BATCH, 5), "distance": (BATCH, 21), "azimuth": (BATCH, 360),
               "elevation": (BATCH, 180)}


def _wave(seed: int = 0, samples: int = SAMPLES, channels: int = 2) -> jax.Array:
    return jnp.asarray(0.1 * np.random.default_rng(seed).standard_normal((BATCH, channels, samples)), jnp.float32)


@functools.lru_cache(maxsize=None)
def _variables():
    return nn.unbox(jax.jit(MODEL.init)(jax.random.PRNGKey(0), _wave()))


def _eval(variables, wave):
    return MODEL.apply(variables, wave, train=False)


def _train(variables, wave, r_drop, r_aug):
    return MODEL.apply(variables, wave, train=True, rngs={"dropout": r_drop, "augment": r_aug},
                       mutable=["batch_stats"])


@functools.lru_cache(maxsize=None)
def _jitted(name):
    return jax.jit({"eval": _eval, "train": _train}[name])


def _check_heads(out):
    chex.assert_shape([out[k] for k in HEAD_SHAPES], list(HEAD_SHAPES.values()))
    chex.assert_tree_all_finite(out)
    chex.assert_type([out[k] for k in HEAD_SHAPES], jnp.float32)


def test_variables_layout():
    v = _variables()
    assert set(v) == {"params", "batch_stats"}
    assert set(v["batch_stats"]) == {"frontend", "stem_bn"}
    chex.assert_shape(v["params"]["pos_embed"], (GRID_T * GRID_F, 32))
    chex.assert_shape(v["params"]["cls_tokens"], (3, 32))
    chex.assert_shape(v["params"]["stem_conv"]["kernel"], (3, 3, 4, 1))
    chex.assert_shape(v["params"]["patch_embed"]["kernel"], (8, 8, 1, 32))
    chex.assert_shape(v["batch_stats"]["frontend"]["bn"]["mean"], (2,))
    assert [k for k in v["params"] if k.startswith("blocks_")] == ["blocks_0"]
    # The position embedding starts as the fixed sin-cos table.
    np.testing.assert_allclose(np.asarray(v["params"]["pos_embed"]), sincos_pos_embed_2d(32, GRID_T, GRID_F),
                               atol=1e-7)


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "eager"])
def test_eval_shapes(use_jit):
    fn = _jitted("eval") if use_jit else _eval
    out = fn(_variables(), _wave())
    _check_heads(out)
    chex.assert_shape(out["tokens"], (BATCH, 3 + GRID_T * GRID_F, 32))
    if not use_jit:  # eager and jit agree
        ref = _jitted("eval")(_variables(), _wave())
        chex.assert_trees_all_close(out, ref, atol=1e-5)


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "eager"])
def test_train_shapes_and_batch_stats(use_jit):
    fn = _jitted("train") if use_jit else _train
    variables = _variables()
    out, updated = fn(variables, _wave(), jax.random.PRNGKey(1), jax.random.PRNGKey(2))
    _check_heads(out)
    chex.assert_shape(out["tokens"], (BATCH, 3 + KEEP_T * KEEP_F, 32))
    assert set(updated) == {"batch_stats"}
    chex.assert_trees_all_equal_shapes(updated["batch_stats"], variables["batch_stats"])
    for path, new in jax.tree_util.tree_leaves_with_path(updated["batch_stats"]):
        old = variables["batch_stats"]
        for k in path:
            old = old[k.key]
        assert np.max(np.abs(np.asarray(new) - np.asarray(old))) > 1e-3, jax.tree_util.keystr(path)


def test_train_augment_rng_controls_the_output():
    fn = _jitted("train")
    variables, wave = _variables(), _wave()
    a, _ = fn(variables, wave, jax.random.PRNGKey(1), jax.random.PRNGKey(2))
    b, _ = fn(variables, wave, jax.random.PRNGKey(1), jax.random.PRNGKey(2))
    c, _ = fn(variables, wave, jax.random.PRNGKey(1), jax.random.PRNGKey(3))
    chex.assert_trees_all_equal(a, b)
    assert np.max(np.abs(np.asarray(a["tokens"]) - np.asarray(c["tokens"]))) > 1e-3
    assert np.max(np.abs(np.asarray(a["classifier"]) - np.asarray(c["classifier"]))) > 1e-6


# The checks run while tracing, so `eval_shape` raises them without computing anything.
def test_mono_input_is_refused():
    with pytest.raises(ValueError, match=r"binaural audio \[batch, 2, time\]; got shape \(2, 1, 16000\)"):
        jax.eval_shape(_eval, _variables(), _wave(channels=1))


def test_too_long_audio_is_refused():
    # 1 s = 101 frames > target_frames=64
    with pytest.raises(ValueError, match="101 STFT frames exceed target_frames=64"):
        jax.eval_shape(_eval, _variables(), _wave(samples=32000))
    # The longest accepted clip: (64 - 1) * 320 samples -> 64 frames.
    out = jax.eval_shape(_eval, _variables(), _wave(samples=63 * 320))
    chex.assert_shape(out["tokens"], (BATCH, 3 + GRID_T * GRID_F, 32))


def _audiomae_pos_embed(embed_dim: int, grid_t: int, grid_f: int) -> np.ndarray:
    """AudioMAE's `get_2d_sincos_pos_embed_flexible(embed_dim, (grid_t, grid_f))`, written out.

    `grid = meshgrid(grid_w, grid_h)` puts the *frequency* (width) index in `grid[0]`, so
    the first half of the channels encodes the frequency index; rows are time-major.
    """
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float64) / (half / 2.0))
    out = np.zeros((grid_t * grid_f, embed_dim))
    for t in range(grid_t):
        for f in range(grid_f):
            row = t * grid_f + f
            out[row, :half] = np.concatenate([np.sin(f * omega), np.cos(f * omega)])
            out[row, half:] = np.concatenate([np.sin(t * omega), np.cos(t * omega)])
    return out


@pytest.mark.parametrize("embed_dim,grid_t,grid_f", [(32, 8, 4), (768, 64, 8)])
def test_sincos_pos_embed_matches_audiomae(embed_dim, grid_t, grid_f):
    ours = sincos_pos_embed_2d(embed_dim, grid_t, grid_f)
    assert ours.shape == (grid_t * grid_f, embed_dim) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _audiomae_pos_embed(embed_dim, grid_t, grid_f), atol=1e-6)


def test_sincos_pos_embed_hand_computed_entries():
    e = sincos_pos_embed_2d(32, 8, 4)  # quarter = 8 channels: sin(f w), cos(f w), sin(t w), cos(t w)
    t, f = 5, 3
    row = e[t * 4 + f]
    np.testing.assert_allclose(row[0], np.sin(3.0), atol=1e-6)                 # omega_0 = 1
    np.testing.assert_allclose(row[1], np.sin(3.0 * 10000 ** (-1 / 8)), atol=1e-6)
    np.testing.assert_allclose(row[8], np.cos(3.0), atol=1e-6)
    np.testing.assert_allclose(row[16], np.sin(5.0), atol=1e-6)
    np.testing.assert_allclose(row[24], np.cos(5.0), atol=1e-6)
    np.testing.assert_allclose(row[31], np.cos(5.0 * 10000 ** (-7 / 8)), atol=1e-6)
    # Token (t=0, f=0): sin parts 0, cos parts 1.
    np.testing.assert_array_equal(e[0], np.tile(np.repeat([0.0, 1.0], 8), 2))


@pytest.mark.parametrize("soft", [False, True], ids=["multi_hot", "soft"])
def test_loss_matches_torch(soft):
    rng = np.random.default_rng(3)
    b = 6
    outputs = {k: (3.0 * rng.standard_normal((b, n))).astype(np.float32)
               for k, n in (("classifier", 355), ("distance", 21), ("azimuth", 360), ("elevation", 180))}
    labels = (rng.uniform(size=(b, 355)) if soft else rng.uniform(size=(b, 355)) < 0.05).astype(np.float32)
    distance, azimuth, elevation = (rng.integers(0, n, b).astype(np.int32) for n in (21, 360, 180))
    total, parts = spatial_ast_loss({k: jnp.asarray(v) for k, v in outputs.items()}, jnp.asarray(labels),
                                    jnp.asarray(distance), jnp.asarray(azimuth), jnp.asarray(elevation))

    t = {k: torch.from_numpy(v).double() for k, v in outputs.items()}
    ce = torch.nn.CrossEntropyLoss()
    ref = {
        "bce": torch.nn.BCEWithLogitsLoss()(t["classifier"], torch.from_numpy(labels).double()),
        "ce_distance": ce(t["distance"], torch.from_numpy(distance).long()),
        "ce_azimuth": ce(t["azimuth"], torch.from_numpy(azimuth).long()),
        "ce_elevation": ce(t["elevation"], torch.from_numpy(elevation).long()),
    }
    ref_total = 1250 * ref["bce"] + ref["ce_distance"] + 2 * (ref["ce_azimuth"] + ref["ce_elevation"])
    for k, v in ref.items():
        np.testing.assert_allclose(float(parts[k]), float(v), atol=1e-5, err_msg=k)
    # The total is ~2e3, where float32's spacing is 1.2e-4: compare relatively (1e-6 ~ 8 ulp).
    np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-6, atol=0)
    assert float(ref_total) > 100  # the 1250 weight is in play


def test_remat_gives_the_same_loss_and_gradients():
    """`remat=True` recomputes the blocks in the backward pass; numbers must not change."""
    remat = MODEL.clone(remat=True)
    variables = _variables()
    labels = jnp.eye(5)[jnp.array([1, 3])]
    bins = jnp.array([2, 7])

    def loss(model, params):
        out, _ = model.apply({**variables, "params": params}, _wave(), train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.PRNGKey(1), "augment": jax.random.PRNGKey(2)})
        return spatial_ast_loss(out, labels, bins, bins, bins)[0]

    a, ga = jax.jit(jax.value_and_grad(lambda p: loss(MODEL, p)))(variables["params"])
    b, gb = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(variables["params"])
    np.testing.assert_allclose(a, b, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), ga, gb)


def test_smoothed_direction_targets():
    """`direction_sigma`: Gaussian targets over 1-degree bins, wrapping for azimuth only;
    the loss with them equals torch's soft-target cross-entropy, and 0 is the original's."""
    soft = np.asarray(smoothed_bins(jnp.asarray([0, 180]), 360, 5.0, circular=True))
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
    assert soft[0, 359] == pytest.approx(soft[0, 1]) and soft[0, 0] == soft[0].max()
    np.testing.assert_allclose(soft[1], np.roll(soft[0], 180), atol=1e-7)
    edge = np.asarray(smoothed_bins(jnp.asarray([0]), 180, 5.0, circular=False))[0]
    assert edge[179] < 1e-20 and edge.argmax() == 0  # elevation does not wrap

    rng = np.random.default_rng(0)
    out = {"classifier": rng.normal(size=(3, 4)), "distance": rng.normal(size=(3, 21)),
           "azimuth": rng.normal(size=(3, 360)), "elevation": rng.normal(size=(3, 180))}
    labels, dist = (rng.random((3, 4)) > 0.5).astype(np.float32), np.array([1, 2, 3])
    az, el = np.array([0, 90, 359]), np.array([10, 90, 170])
    args = ({k: jnp.asarray(v) for k, v in out.items()}, jnp.asarray(labels), jnp.asarray(dist), jnp.asarray(az),
            jnp.asarray(el))
    _, hard = spatial_ast_loss(*args)
    _, smooth = spatial_ast_loss(*args, direction_sigma=8.0)
    for name, n, bins, circ in (("ce_azimuth", 360, az, True), ("ce_elevation", 180, el, False)):
        target = torch.from_numpy(np.asarray(smoothed_bins(jnp.asarray(bins), n, 8.0, circ)))
        want = torch.nn.functional.cross_entropy(torch.from_numpy(out[name[3:]]).float(), target)
        assert float(smooth[name]) == pytest.approx(float(want), rel=1e-5)
        hard_want = torch.nn.functional.cross_entropy(torch.from_numpy(out[name[3:]]).float(), torch.from_numpy(bins))
        assert float(hard[name]) == pytest.approx(float(hard_want), rel=1e-5)


def test_stem_channels_option():
    """`stem_channels=1` is the original's 4 -> 1 stem; more keeps the four maps apart."""
    wave = jax.ShapeDtypeStruct((1, 2, 3200), jnp.float32)
    for channels in (1, 4):
        model = MODEL.clone(stem_channels=channels)
        v = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), wave))
        assert v["params"]["stem_conv"]["kernel"].shape == (3, 3, 4, channels)
        assert v["params"]["patch_embed"]["kernel"].shape == (8, 8, channels, 32)
        assert v["batch_stats"]["stem_bn"]["mean"].shape == (channels,)
        out = jax.eval_shape(lambda v, w: model.apply(v, w), v, wave)
        assert out["azimuth"].shape == (1, 360)


def test_normalize_ipd_option():
    """`normalize_ipd=True` gives the two IPD-mel maps their own BatchNorm: in training they
    come out with zero mean and unit variance per channel instead of the ~0.015 std the
    Slaney filterbank leaves them; the default (the original) has no such statistics."""
    frontend = BinauralFrontend(32000, 1024, 320, 32, 50.0, 14000.0, 64, normalize_ipd=True)
    wave = _wave(3, samples=63 * 320)  # 64 frames: no resize, so the statistics are the output's
    v = frontend.init(jax.random.PRNGKey(0), wave, True)
    assert set(v["batch_stats"]) == {"bn", "ipd_bn"}
    x, _ = frontend.apply(v, wave, True, mutable=["batch_stats"])
    plain, _ = frontend.clone(normalize_ipd=False).apply({"batch_stats": {"bn": v["batch_stats"]["bn"]}}, wave, True,
                                                         mutable=["batch_stats"])
    np.testing.assert_allclose(x[..., :2], plain[..., :2], atol=1e-6)  # the log-mels are unchanged
    assert float(jnp.std(plain[..., 2:])) < 0.1
    # BatchNorm's eps (1e-5) is not negligible against the raw variance (~2e-4), hence not exactly 1.
    raw_var = jnp.var(plain[..., 2:], axis=(0, 1, 2))
    np.testing.assert_allclose(jnp.std(x[..., 2:], axis=(0, 1, 2)), jnp.sqrt(raw_var / (raw_var + 1e-5)), rtol=1e-3)
    assert float(jnp.min(jnp.std(x[..., 2:], axis=(0, 1, 2)))) > 0.9
    np.testing.assert_allclose(jnp.mean(x[..., 2:], axis=(0, 1, 2)), 0.0, atol=1e-4)
    assert "ipd_bn" not in _variables()["batch_stats"]["frontend"]
