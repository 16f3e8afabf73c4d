"""CLAP against Hugging Face transformers: tiny random `ClapModel`s, fused and unfused,
`save_pretrained` (safetensors), converted with `convert_hf` (once end to end through
`launch.convert.run_hf` + `load_pretrained`): audio embeddings (unfused; fused with
`is_longer` mixed in one batch), text embeddings of a padded batch, both logits; chex
shapes with and without jit; logical axes; training mode; conversion errors.

The tiny audio tower keeps every path of the real one: 16 mel bins and spec_size 64 give
freq_ratio 4 as 64 / 256 does; 201 frames are resized to 256; three stages on a 16, 8, 4
grid with window 4, so shifted windows (and their -100 mask) run in two stages and the
last stage is one unshifted window, as HTSAT-tiny's 8 x 8. Weights, BatchNorm statistics,
relative-position tables and the two logit scales are all drawn at random (HF starts the
tables at zero and both scales equal).

fp32 parity tolerance: max abs err <= 1e-4.
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
import transformers

from jaxaudio.convert import ConversionError
from jaxaudio.convert.hf import convert_hf, load_pretrained
from jaxaudio.models.clap import Clap

TOL = 1e-4
BATCH, FRAMES, MELS, PROJ, LEN = 3, 201, 16, 16, 7
AUDIO = dict(spec_size=64, num_mel_bins=MELS, patch_embeds_hidden_size=16, depths=[2, 2, 2],
             num_attention_heads=[2, 2, 4], window_size=4, hidden_size=64)
TEXT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40)
IS_LONGER = np.array([True, False, True])
AXIS_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "tokens", "norm", "conv_h", "conv_w", "conv_in"}


def hf_config(fusion: bool) -> transformers.ClapConfig:
    return transformers.ClapConfig(audio_config={**AUDIO, "enable_fusion": fusion}, text_config=TEXT,
                                   projection_dim=PROJ)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """std 0.2 weights, norm scales around 1, random BatchNorm statistics and logit scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_scale = name.endswith(".weight") and p.ndim == 1
            p.copy_(1 + 0.2 * noise if is_scale else 0.2 * noise)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.5 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + 1.5 * torch.rand(b.shape, generator=g))
        model.logit_scale_a.fill_(1.7)
        model.logit_scale_t.fill_(2.9)
    return model.eval()


def inputs(fusion: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    features = (3.0 * rng.standard_normal((BATCH, 4 if fusion else 1, FRAMES, MELS)) - 20).astype(np.float32)
    ids = rng.integers(3, TEXT["vocab_size"], (BATCH, LEN))
    ids[:, 0], mask = 0, np.ones((BATCH, LEN), np.int64)
    for row, length in enumerate((LEN, 4, 5)):  # </s> then <pad> = 1
        ids[row, length - 1] = 2
        ids[row, length:] = 1
        mask[row, length:] = 0
    return features, ids, mask


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"fused"|"unfused": (save_pretrained dir, reference outputs)}."""
    out = {}
    for seed, fusion in enumerate((False, True)):
        name = "fused" if fusion else "unfused"
        model = randomize(transformers.ClapModel(hf_config(fusion)), seed)
        features, ids, mask = inputs(fusion, seed)
        x, is_longer = torch.from_numpy(features), torch.from_numpy(IS_LONGER)[:, None]
        with torch.no_grad():
            o = model(input_ids=torch.from_numpy(ids), input_features=x, attention_mask=torch.from_numpy(mask),
                      is_longer=is_longer if fusion else None)
            want = {k: getattr(o, k).numpy() for k in ("audio_embeds", "text_embeds", "logits_per_audio",
                                                       "logits_per_text")}
            want["pooled"] = o.audio_model_output.pooler_output.numpy()
            if fusion:  # the same clips, none fused: the rows of a batch must not interact
                want["audio_unfused_rows"] = model.get_audio_features(
                    input_features=x, is_longer=torch.zeros_like(is_longer)).pooler_output.numpy()
        directory = tmp_path_factory.mktemp(f"hf_clap_{name}")
        model.save_pretrained(directory)
        out[name] = (directory, (features, ids, mask), want)
    return out


@pytest.fixture(scope="module")
def converted(checkpoints):
    return {name: convert_hf(str(d)) for name, (d, _, _) in checkpoints.items()}


@functools.lru_cache(maxsize=None)
def _forward(module: Clap):
    return jax.jit(lambda v, x, longer, ids, mask: module.apply(v, x, longer, ids, mask))


def _max_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)))


def _check(name, got, want):
    err = _max_err(got, want)
    print(f"parity {name}: max abs err {err:.2e}")
    assert err <= TOL, f"{name}: max abs err {err:.3g} > {TOL}"


def test_config_and_layout(converted):
    variables, config = converted["fused"]
    assert config["model"] == "clap" and config["source_model_type"] == "clap"
    kw = config["kwargs"]
    assert kw["audio"]["enable_fusion"] and not converted["unfused"][1]["kwargs"]["audio"]["enable_fusion"]
    assert kw["text"]["type_vocab_size"] == 1 and kw["pad_token_id"] == 1 and kw["projection_dim"] == PROJ
    p, s = variables["params"], variables["batch_stats"]
    a = p["audio"]
    chex.assert_shape([a["patch_embed"]["proj"]["kernel"], a["patch_embed"]["mel_conv2d"]["kernel"],
                       a["layers_0_blocks_1"]["relative_position_bias_table"], a["layers_1_downsample"]["reduction"]
                       ["kernel"], a["layers_0_blocks_0"]["attn"]["query"]["kernel"], p["logit_scale_a"],
                       p["audio_projection"]["linear1"]["kernel"], p["text"]["embeddings"]["position_embeddings"]],
                      [(4, 4, 1, 16), (4, 12, 1, 16), (49, 2), (128, 64), (16, 2, 8), (), (64, PROJ), (40, 32)])
    assert set(s["audio"]["patch_embed"]["fusion_model"]) == {"local_att", "global_att"}
    np.testing.assert_allclose(p["logit_scale_t"], 2.9, rtol=1e-6)


@pytest.mark.parametrize("name", ["unfused", "fused"])
def test_matches_transformers(checkpoints, converted, name):
    """Audio embeddings (fused: is_longer mixed), text embeddings with padding, and logits."""
    _, (features, ids, mask), want = checkpoints[name]
    variables, config = converted[name]
    module = Clap(**config["kwargs"])
    longer = jnp.asarray(IS_LONGER) if name == "fused" else None
    out = _forward(module)(variables, jnp.asarray(features), longer, jnp.asarray(ids), jnp.asarray(mask))
    for key in ("audio_embeds", "text_embeds", "logits_per_audio", "logits_per_text"):
        _check(f"{name} {key}", out[key], want[key])
    assert np.std(want["pooled"]) > 0.1  # not a degenerate forward
    if name == "fused":  # the same clips with no row longer: every row takes the global path only
        got = _forward(module)(variables, jnp.asarray(features), jnp.zeros((BATCH,), bool), jnp.asarray(ids),
                               jnp.asarray(mask))["audio_embeds"]
        _check("fused audio_embeds, no row longer", got, want["audio_unfused_rows"])
        assert _max_err(got, want["audio_embeds"]) > 1e-2  # the local path changes the longer rows


def test_end_to_end_through_the_launcher(checkpoints, converted, tmp_path):
    from launch.convert import run_hf
    directory, (features, ids, mask), want = checkpoints["fused"]
    summary = run_hf(str(directory), str(tmp_path / "converted"))
    assert summary["model"] == "clap"
    # Every tensor but the buffers (position_ids, token_type_ids, relative_position_index, num_batches_tracked).
    module, variables = load_pretrained(str(tmp_path / "converted"))
    assert module == Clap(**converted["fused"][1]["kwargs"])
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, variables), converted["fused"][0])
    got = _forward(module)(variables, jnp.asarray(features), jnp.asarray(IS_LONGER), jnp.asarray(ids),
                           jnp.asarray(mask))
    _check("fused logits_per_text via run_hf", got["logits_per_text"], want["logits_per_text"])


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "eager"])
def test_shapes(checkpoints, converted, use_jit):
    """Fresh inputs through the jitted forward of the parity test (same shapes: no new
    compile) and eagerly; eagerly also the audio tower's pooled output against HF's."""
    variables, config = converted["fused"]
    module = Clap(**config["kwargs"])
    fn = _forward(module) if use_jit else (lambda v, *a: module.apply(v, *a))
    features, ids, mask = inputs(True, seed=5)
    out = fn(variables, jnp.asarray(features), jnp.asarray([False, True, True]), jnp.asarray(ids), jnp.asarray(mask))
    chex.assert_shape([out["audio_embeds"], out["text_embeds"], out["logits_per_audio"], out["logits_per_text"]],
                      [(BATCH, PROJ), (BATCH, PROJ), (BATCH, BATCH), (BATCH, BATCH)])
    chex.assert_type(out["logits_per_audio"], jnp.float32)
    chex.assert_tree_all_finite(out)
    np.testing.assert_allclose(np.linalg.norm(out["audio_embeds"], axis=-1), 1.0, rtol=1e-5)
    if not use_jit:
        _, (features, _, _), want = checkpoints["fused"]
        pooled, tokens = module.apply(variables, jnp.asarray(features), jnp.asarray(IS_LONGER),
                                      method=lambda m, x, longer: m.audio_tower(x, longer))
        chex.assert_shape([pooled, tokens], [(BATCH, 64), (BATCH, 16, 64)])  # 4 x 4 tokens of width 16 * 2**2
        _check("fused audio pooled (before projection)", pooled, want["pooled"])


def test_init_logical_axes_and_train_mode(converted):
    variables, config = converted["fused"]
    module = Clap(**{**config["kwargs"], "audio": {**config["kwargs"]["audio"], "drop_path_rate": 0.1}})
    features, ids, mask = inputs(True, seed=6)
    args = (jnp.asarray(features), jnp.asarray(IS_LONGER), jnp.asarray(ids), jnp.asarray(mask))
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
    assert {n for v in leaves for n in v.names} <= AXIS_NAMES
    chex.assert_trees_all_equal_shapes(nn.unbox(boxed), variables)

    # Training mode of the audio tower (its BatchNorms); Bert's dropout is tested in test_bert.py.
    train = jax.jit(lambda v, rng: module.apply(v, *args[:2], train=True, rngs={"dropout": rng},
                                                mutable=["batch_stats"], method="audio_features"))
    out, updates = train(variables, jax.random.PRNGKey(1))
    chex.assert_tree_all_finite(out)
    before, after = variables["batch_stats"]["audio"], updates["batch_stats"]["audio"]
    assert not np.allclose(before["batch_norm"]["mean"], after["batch_norm"]["mean"])
    assert not np.allclose(before["patch_embed"]["fusion_model"]["local_att"]["bn1"]["var"],
                           after["patch_embed"]["fusion_model"]["local_att"]["bn1"]["var"])
    with pytest.raises(ValueError, match=r"\[batch, 4, frames, mel\]"):
        jax.eval_shape(lambda v: module.apply(v, args[0][:, :1], None, args[2], args[3]), variables)


def _edited_copy(src, dst, section, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg[section].update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_fusion_setting_must_match_the_weights(checkpoints, tmp_path):
    with pytest.raises(ConversionError, match=r"unexpected keys[\s\S]*patch_embed\.mel_conv2d\.weight"):
        convert_hf(_edited_copy(checkpoints["fused"][0], tmp_path / "a", "audio_config", enable_fusion=False))
    with pytest.raises(ConversionError, match=r"missing variables[\s\S]*params/audio/patch_embed/mel_conv2d/kernel"):
        convert_hf(_edited_copy(checkpoints["unfused"][0], tmp_path / "b", "audio_config", enable_fusion=True))


def test_unsupported_config_is_named(checkpoints, tmp_path):
    with pytest.raises(ConversionError, match="channel_map"):
        convert_hf(_edited_copy(checkpoints["fused"][0], tmp_path / "a", "audio_config", fusion_type="channel_map"))
    with pytest.raises(ConversionError, match="hidden_size=32"):
        convert_hf(_edited_copy(checkpoints["fused"][0], tmp_path / "b", "audio_config", hidden_size=32))


def test_fused_training_mode_matches_transformers(checkpoints, converted):
    """Training mode, fused, `is_longer` mixed: the audio embeddings and every updated BatchNorm
    statistic equal HF's, whose fusion block (and its BatchNorms) sees only the longer rows."""
    directory, _, _ = checkpoints["fused"]
    variables, config = converted["fused"]
    model = transformers.ClapModel.from_pretrained(directory)
    for m in model.modules():  # dropout off: only the BatchNorms differ between the modes
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    features, _, _ = inputs(True, seed=7)
    longer = np.array([True, False, True])  # torch's BatchNorm needs 2+ rows in training
    with torch.no_grad():
        want = model.get_audio_features(input_features=torch.from_numpy(features),
                                        is_longer=torch.from_numpy(longer)[:, None]).pooler_output.numpy()
    audio = {**config["kwargs"]["audio"], "dropout": 0.0, "attention_dropout": 0.0, "drop_path_rate": 0.0}
    module = Clap(**{**config["kwargs"], "audio": audio})
    got, updates = jax.jit(lambda v, x, lo: module.apply(v, x, lo, train=True, mutable=["batch_stats"],
                                                        rngs={"dropout": jax.random.PRNGKey(0)},
                                                        method="audio_features"))(
        variables, jnp.asarray(features), jnp.asarray(longer))
    _check("fused audio_embeds, train mode", got, want)
    stats = updates["batch_stats"]["audio"]
    state = model.state_dict()
    for ours, theirs in (("batch_norm", "batch_norm"),
                         ("patch_embed/fusion_model/local_att/bn1", "patch_embed.fusion_model.local_att.1"),
                         ("patch_embed/fusion_model/global_att/bn2", "patch_embed.fusion_model.global_att.5")):
        node = functools.reduce(lambda d, k: d[k], ours.split("/"), stats)
        prefix = f"audio_model.audio_encoder.{theirs}."
        np.testing.assert_allclose(node["mean"], state[prefix + "running_mean"].numpy(), atol=1e-5, err_msg=ours)
        np.testing.assert_allclose(node["var"], state[prefix + "running_var"].numpy(), atol=1e-5, rtol=1e-5,
                                   err_msg=ours)
