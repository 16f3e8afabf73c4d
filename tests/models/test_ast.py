"""AST against Hugging Face transformers: tiny `ASTModel` and `ASTForAudioClassification`
with random weights, `save_pretrained` (safetensors), converted with `convert_hf` and once
end to end through `launch.convert.run_hf` + `load_pretrained`; chex shapes with and
without jit; `ast_features` against `ASTFeatureExtractor`; mismatched and incomplete
checkpoints.

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
from jaxaudio.models.ast import AST, ast_features

TOL = 1e-4
BATCH, FRAMES, MELS, HIDDEN = 2, 64, 32, 64
TOKENS = 2 + 2 * 5  # (32 - 16) // 10 + 1 = 2 frequency by (64 - 16) // 10 + 1 = 5 time patches
LABELS = 5
HF_CONFIG = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_length=FRAMES, num_mel_bins=MELS, frequency_stride=10, time_stride=10, patch_size=16)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (HF starts the tokens and position embedding at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = "layernorm" in name and name.endswith(".weight")
            p.copy_((1.0 if is_scale else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Saved HF checkpoints and their outputs on one random input."""
    base = _randomize(transformers.ASTModel(transformers.ASTConfig(**HF_CONFIG)), seed=0)
    clf = _randomize(transformers.ASTForAudioClassification(
        transformers.ASTConfig(**HF_CONFIG, num_labels=LABELS)), seed=1)
    x = np.random.default_rng(0).standard_normal((BATCH, FRAMES, MELS)).astype(np.float32)
    dirs = {}
    with torch.no_grad():
        out = base(torch.from_numpy(x))
        want = {"last_hidden_state": out.last_hidden_state.numpy(), "pooler_output": out.pooler_output.numpy(),
                "logits": clf(torch.from_numpy(x)).logits.numpy()}
    for name, model in (("base", base), ("clf", clf)):
        dirs[name] = tmp_path_factory.mktemp(f"hf_ast_{name}")
        model.save_pretrained(dirs[name])
    return dirs, x, want


@pytest.fixture(scope="module")
def converted(checkpoints):
    dirs, _, _ = checkpoints
    return {name: convert_hf(str(d)) for name, d in dirs.items()}


@functools.lru_cache(maxsize=None)
def _forward(module: AST):
    return jax.jit(lambda v, x: module.apply(v, x))


def _max_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)))


def test_config_and_key_layout(checkpoints, converted):
    dirs, _, _ = checkpoints
    variables, config = converted["base"]
    assert config["model"] == "ast" and config["source_model_type"] == "audio-spectrogram-transformer"
    assert config["kwargs"]["num_labels"] == 0 and converted["clf"][1]["kwargs"]["num_labels"] == LABELS
    p = variables["params"]
    chex.assert_shape([p["cls_token"], p["position_embeddings"], p["patch_embeddings"]["kernel"],
                       p["layer_1"]["attn"]["query"]["kernel"], p["layer_1"]["attn"]["out"]["kernel"]],
                      [(HIDDEN,), (TOKENS, HIDDEN), (16, 16, 1, HIDDEN), (HIDDEN, 4, 16), (4, 16, HIDDEN)])
    assert "classifier" not in p and "classifier" in converted["clf"][0]["params"]


def test_base_model_matches_transformers(checkpoints, converted):
    _, x, want = checkpoints
    variables, config = converted["base"]
    module = AST(**config["kwargs"])
    out = _forward(module)(variables, jnp.asarray(x))
    for name in ("last_hidden_state", "pooler_output"):
        err = _max_err(out[name], want[name])
        assert err <= TOL, f"{name}: max abs err {err:.3g} > {TOL}"
    assert np.std(want["pooler_output"]) > 0.1  # not a degenerate forward


def test_classifier_end_to_end_through_the_launcher(checkpoints, converted, tmp_path):
    from launch.convert import run_hf
    dirs, x, want = checkpoints
    summary = run_hf(str(dirs["clf"]), str(tmp_path / "converted"))
    assert summary["model"] == "ast" and summary["tensors"] == summary["source_tensors"]
    module, variables = load_pretrained(str(tmp_path / "converted"))
    assert module == AST(**converted["clf"][1]["kwargs"])
    out = _forward(module)(variables, jnp.asarray(x))
    err = _max_err(out["logits"], want["logits"])
    assert err <= TOL, f"logits: max abs err {err:.3g} > {TOL}"
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, variables), converted["clf"][0])


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "eager"])
def test_shapes(converted, use_jit):
    variables, config = converted["clf"]
    module = AST(**config["kwargs"])
    fn = _forward(module) if use_jit else module.apply
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, FRAMES, MELS)), jnp.float32)
    out = fn(variables, x)
    chex.assert_shape([out["last_hidden_state"], out["pooler_output"], out["logits"]],
                      [(3, TOKENS, HIDDEN), (3, HIDDEN), (3, LABELS)])
    chex.assert_type(out["logits"], jnp.float32)
    chex.assert_tree_all_finite(out)


def test_init_logical_axes_and_train_mode():
    module = AST(**{**_kwargs(), "dropout": 0.1})
    x = jnp.zeros((1, FRAMES, MELS))
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
    variables = nn.unbox(module.init(jax.random.PRNGKey(0), x))
    out = module.apply(variables, x + 1.0, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    chex.assert_shape(out["logits"], (1, LABELS))
    with pytest.raises(ValueError, match="max_length"):
        module.apply(variables, jnp.zeros((1, FRAMES + 1, MELS)))


def _kwargs():
    from jaxaudio.convert.ast import config_from_hf
    return config_from_hf({**transformers.ASTConfig(**HF_CONFIG, num_labels=LABELS).to_dict(),
                           "architectures": ["ASTForAudioClassification"]})


@pytest.mark.filterwarnings("ignore:At least one mel filter")  # 128 bins leave the lowest one empty
def test_features_match_the_feature_extractor():
    """transformers' numpy path (torchaudio cannot import here): float64 FFT and mel filters.

    Normalised features, max abs err <= 1e-4 where a bin's energy is within e^12 of its
    frame's strongest; below, float32 FFT round-off dominates (see tests/features/test_kaldi.py),
    so there the energies must agree to 3e-5 of the frame's strongest: 3x looser than against
    Kaldi because transformers keeps its mel filters in float64 while Kaldi (and we) round
    them in float32, which moves a weight by up to 1.4e-5.
    """
    fe = transformers.ASTFeatureExtractor(max_length=100)
    rng = np.random.default_rng(2)
    t = np.arange(20000) / 16000
    waves = [(0.1 * rng.standard_normal(20000)).astype(np.float32),
             (0.5 * np.sin(2 * np.pi * (100 + 3000 * t) * t)).astype(np.float32)]
    features = jax.jit(functools.partial(ast_features, max_length=100))
    for n in (8000, 20000):  # padded, truncated
        batch = np.stack([w[:n] for w in waves])
        ours = np.asarray(features(jnp.asarray(batch)), np.float64)
        ref = np.asarray(fe(list(batch), sampling_rate=16000, return_tensors="np")["input_values"], np.float64)
        assert ours.shape == ref.shape == (2, 100, 128)
        frames = 1 + (n - 400) // 160
        if frames < 100:  # zero log-mel rows, normalised
            np.testing.assert_allclose(ours[:, frames:], 4.2677393 / (2 * 4.5689974), rtol=1e-6)
        log_ref = ref * 2 * 4.5689974 - 4.2677393
        strong = log_ref - log_ref.max(-1, keepdims=True) > -12
        err = np.max(np.abs(ours - ref)[strong])
        assert err <= TOL, f"n={n}: max abs err {err:.3g} > {TOL}"
        e_ours, e_ref = np.exp(ours * 2 * 4.5689974 - 4.2677393), np.exp(log_ref)
        rel = np.max(np.abs(e_ours - e_ref) / e_ref.max(-1, keepdims=True))
        assert rel <= 3e-5, f"n={n}: energy error {rel:.3g} of the frame maximum > 3e-5"


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_weights_of_another_hidden_size_are_refused(checkpoints, tmp_path):
    dirs, _, _ = checkpoints
    src = _edited_copy(dirs["clf"], tmp_path / "ckpt", hidden_size=32, num_attention_heads=2)
    with pytest.raises(ConversionError) as e:
        convert_hf(src)
    msg = str(e.value)
    assert "mis-shaped" in msg and "audio_spectrogram_transformer.embeddings.cls_token" in msg, msg
    assert "classifier.dense.weight (5, 64) -> params/classifier/kernel expects (32, 5)" in msg, msg


def test_layer_count_mismatch_is_refused(checkpoints, tmp_path):
    dirs, _, _ = checkpoints
    with pytest.raises(ConversionError, match=r"missing variables[\s\S]*params/layer_2/attn/query/kernel"):
        convert_hf(_edited_copy(dirs["base"], tmp_path / "more", num_hidden_layers=3))
    with pytest.raises(ConversionError, match=r"unexpected keys[\s\S]*encoder\.layer\.1\.attention"):
        convert_hf(_edited_copy(dirs["base"], tmp_path / "fewer", num_hidden_layers=1))


def test_head_weights_without_a_classifier_config_are_named(checkpoints, tmp_path):
    dirs, _, _ = checkpoints
    with pytest.raises(ConversionError, match=r"unexpected keys[\s\S]*classifier\.dense\.weight"):
        convert_hf(_edited_copy(dirs["clf"], tmp_path / "ckpt", architectures=["ASTModel"]))


@pytest.mark.parametrize("field", ["time_stride", "hidden_size", "layer_norm_eps"])
def test_missing_config_field_is_named(checkpoints, tmp_path, field):
    dirs, _, _ = checkpoints
    with pytest.raises(ConversionError, match=f"field '{field}' is missing"):
        convert_hf(_edited_copy(dirs["base"], tmp_path / "ckpt", **{field: None}))


def test_unsupported_config_is_named(checkpoints, tmp_path):
    dirs, _, _ = checkpoints
    with pytest.raises(ConversionError, match="qkv_bias"):
        convert_hf(_edited_copy(dirs["base"], tmp_path / "a", qkv_bias=False))
    with pytest.raises(ConversionError, match="hidden_act='tanh'"):
        convert_hf(_edited_copy(dirs["base"], tmp_path / "b", hidden_act="tanh"))
