"""BEATs against golden outputs of the ORIGINAL code (microsoft/unilm `beats/`), its converter,
and shapes.

How `tests/golden/beats_tiny.npz` and `tests/golden/beats_tiny_preln.npz` were made
--------------------------------------------------------------------------------------
* Original code: microsoft/unilm `beats/BEATs.py`, `backbone.py`, `modules.py` at commit
  768a3c873f598bb9b4d4dfb9267b099e35f8fe56 (stored in each npz as `unilm_commit`), unchanged,
  outside this repository (`/work/golden_src/beats/`, with the generator `make_golden.py`).
* torchaudio cannot be imported with the CPU torch 2.13 wheel here, so a stand-in package
  named `torchaudio` next to the originals provides only `compliance.kaldi.fbank`, computed
  by kaldi-native-fbank 1.22.5 with torchaudio's defaults (dither 0, povey window,
  pre-emphasis 0.97, DC removal, 512-point FFT, snip_edges, low_freq 20, no energy).
  kaldi-native-fbank is what `jaxaudio.features.kaldi` is tested against; on these
  waveforms the two normalised fbanks differ by at most 2.4e-4 (the weakest, lowest bin).
* Model: `BEATs(BEATsConfig(cfg))` with `cfg` as stored (json) in the npz, `.eval()`, fp32 CPU.
  beats_tiny: embed_dim 32 -> encoder_embed_dim 64, 2 DeepNorm post-LN layers, 4 heads,
  ffn 128, conv_pos 16 / groups 4, 320 buckets, max_distance 800, gru_rel_pos, fine-tuned
  with predictor_class 5. beats_tiny_preln: layer_norm_first, no deep_norm, no gate,
  embed_dim = encoder_embed_dim 48 (no post_extract_proj), patch conv bias, 3 heads,
  conv_pos 15 (odd: SamePad drops nothing) / groups 3, 32 buckets with max_distance 40
  (the log range and the cap are reached), not fine-tuned.
* Weights (stored under `state_dict/<original key>`): numpy `default_rng(0)` (tiny) and
  `default_rng(1)` (preln) over the state-dict keys in order: linear/conv weights
  N(0, 1)/sqrt(fan_in), biases N(0, 0.2^2), LayerNorm scales 1 + N(0, 0.2^2),
  relative_attention_bias N(0, 1) (layer 1's copy = layer 0's: one shared module),
  grep_a U(0.3, 2.5), pos conv weight_g U(0.5, 2), weight_v N(0, 1); loaded strictly.
* Inputs: `wave` [2, 38400] (stored as float16, fed as float32): 2.4 s and 1.7 s (zero
  padded) of 0.3 x chirp + 0.05 x white noise (seed 1234); `padding_mask` True at the padding.
  beats_tiny runs `extract_features(wave, padding_mask)`; beats_tiny_preln without a mask.
* Outputs: `features` [2, 112, C] = the encoder's output (forward hook on `model.encoder`),
  `padding_mask_out` [2, 112] (tiny only: the token mask `extract_features` returns) and
  `lprobs` [2, 5] (tiny only: what `extract_features` returns, sigmoid of the masked mean
  of the predictor logits).

fp32 parity: max abs error <= 1e-4 (features: measured 4.4e-5 and 2.9e-5; pre-sigmoid
logits: 7.5e-7 against logit(lprobs) in float64).
"""
import argparse
import functools
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxaudio.convert import ConversionError, convert, load_converted
from jaxaudio.convert.beats import build, config_from_checkpoint, key_map, load_beats_checkpoint
from jaxaudio.models.beats import BEATs, grad_multiply, reduce_padding_mask

TOL = 1e-4
GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden")
LABELS = {0: "/m/09x0r", 1: "/m/05zppz", 2: "/m/02zsn", 3: "/m/0ytgt", 4: "/m/01h8n0"}


def _golden(name: str) -> dict:
    g = np.load(os.path.join(GOLDEN, f"{name}.npz"))
    return {
        "cfg": json.loads(str(g["cfg"])),
        "state_dict": {k[len("state_dict/"):]: g[k] for k in g.files if k.startswith("state_dict/")},
        "wave": g["wave"].astype(np.float32),
        "padding_mask": g["padding_mask"] if g["padding_mask"].size else None,
        **{k: g[k] for k in ("features", "padding_mask_out", "lprobs") if k in g.files},
    }


def _save_checkpoint(path, golden: dict, **extra) -> str:
    torch.save({"cfg": golden["cfg"], "model": {k: torch.from_numpy(v) for k, v in golden["state_dict"].items()},
                "label_dict": LABELS, **extra}, path)
    return str(path)


def _max_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))


@functools.lru_cache(maxsize=None)
def _forward(module: BEATs, return_logits: bool = False):
    return jax.jit(lambda v, wave, mask: module.apply(v, wave, mask, return_logits=return_logits))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """beats_tiny converted from a checkpoint file shaped like the original's."""
    g = _golden("beats_tiny")
    path = _save_checkpoint(tmp_path_factory.mktemp("beats") / "beats_tiny.pt", g)
    module, variables, labels = load_beats_checkpoint(path)
    return g, path, module, variables, labels


def _convert(g: dict, cfg: dict | None = None, state_dict: dict | None = None):
    module, example = build(config_from_checkpoint(cfg or g["cfg"]))
    expected = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *example))
    return module, convert(state_dict or g["state_dict"], key_map(module), expected)


def test_golden_tiny(tiny):
    g, _, module, variables, labels = tiny
    assert labels == LABELS
    features, pad, logits = _forward(module, True)(variables, g["wave"], g["padding_mask"])
    np.testing.assert_array_equal(np.asarray(pad), g["padding_mask_out"])
    assert np.asarray(pad).sum() == 27  # the shorter clip's last 27 tokens: the mask is non-trivial
    err = _max_err(features, g["features"])
    assert err <= TOL, f"features: max abs err {err:.2e} > {TOL}"
    lprobs = g["lprobs"].astype(np.float64)
    err = _max_err(logits, np.log(lprobs / (1 - lprobs)))
    assert err <= TOL, f"logits vs logit(original lprobs): max abs err {err:.2e} > {TOL}"
    err = _max_err(jax.nn.sigmoid(logits), lprobs)
    assert err <= TOL, f"sigmoid(logits) vs original lprobs: max abs err {err:.2e} > {TOL}"


def test_golden_pre_layer_norm_without_mask():
    g = _golden("beats_tiny_preln")
    module, variables = _convert(g)
    assert "post_extract_proj" not in variables["params"] and "grep_a" not in variables["params"]["layers_0"]
    features, pad = _forward(module)(variables, g["wave"], None)
    assert not np.asarray(pad).any()
    err = _max_err(features, g["features"])
    assert err <= TOL, f"features: max abs err {err:.2e} > {TOL}"


def test_golden_is_sensitive(tiny):
    """Each of the BEATs-specific parts moves the outputs far beyond the tolerance."""
    g, _, module, variables, _ = tiny
    base = np.asarray(_forward(module)(variables, g["wave"], g["padding_mask"])[0])
    perturbations = {
        "grep_a": ("layers_1", "grep_a"), "grep_linear": ("layers_0", "grep_linear", "bias"),
        "relative_attention_bias": ("relative_attention_bias",), "pos_conv": ("pos_conv", "bias"),
    }
    for name, path in perturbations.items():
        params = jax.tree.map(np.array, variables["params"])
        node = params
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = node[path[-1]] * 0.5
        moved = _max_err(_forward(module)({"params": params}, g["wave"], g["padding_mask"])[0], base)
        assert moved > 1e-2, f"halving {name} moved the features by only {moved:.2e}"


def test_shapes_with_and_without_jit(tiny):
    """Batched clips with padding masks; eager and jitted agree; bf16 compute keeps the shapes."""
    _, _, module, variables, _ = tiny
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal((3, 8000))).astype(np.float32)  # 0.5 s: 48 frames -> 3 x 8 tokens
    mask = np.zeros(wave.shape, bool)
    mask[1, 5000:] = True
    mask[2, 2000:] = True
    eager = module.apply(variables, wave, mask, return_logits=True)
    jitted = _forward(module, True)(variables, wave, mask)
    for out in (eager, jitted):
        chex.assert_shape(out[0], (3, 24, 64))
        chex.assert_shape(out[1], (3, 24))
        chex.assert_shape(out[2], (3, 5))
        chex.assert_tree_all_finite(out[0])
    np.testing.assert_array_equal(np.asarray(eager[1]), np.asarray(jitted[1]))
    # 8000 % 48 = 32 samples dropped, frames are 166-sample chunks: padding from sample 5000
    # (2000) covers frames 31.. (13..), and pairs of frames make tokens: tokens 16.. (7..).
    assert [int(n) for n in np.asarray(jitted[1]).sum(-1)] == [0, 8, 17]
    err = _max_err(eager[0], jitted[0])
    assert err <= 1e-5, f"eager vs jit: {err:.2e}"
    bf16 = BEATs(**{**config_from_checkpoint(tiny[0]["cfg"]), "dtype": jnp.bfloat16})
    features, pad = _forward(bf16)(variables, wave, mask)
    chex.assert_shape(features, (3, 24, 64))
    assert features.dtype == jnp.bfloat16
    err = _max_err(features.astype(jnp.float32), jitted[0])
    assert err < 0.25, f"bf16 vs fp32 features: {err:.2e}"


def test_padding_mask_reduction_is_the_originals():
    # 10 samples -> 3 positions: the last 10 % 3 = 1 sample is dropped, chunks of 3 must be all padding.
    mask = np.array([[0, 0, 0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1, 1, 0, 1]], bool)
    np.testing.assert_array_equal(np.asarray(reduce_padding_mask(mask, 3)), [[0, 0, 1], [0, 0, 0]])


def test_grad_multiply_scales_only_the_gradient():
    f = lambda x: jnp.sum(grad_multiply(x, 0.6) ** 2)  # noqa: E731
    x = jnp.arange(3.0)
    np.testing.assert_allclose(jax.grad(f)(x), 0.6 * 2 * x)
    np.testing.assert_allclose(grad_multiply(x, 0.6), x)


def test_converter_accounts_for_every_key():
    g = _golden("beats_tiny")
    sd = dict(g["state_dict"])
    del sd["encoder.layers.1.fc2.bias"]
    sd["encoder.layers.0.self_attn.bias_k"] = np.zeros((1, 1, 64), np.float32)
    sd["encoder.layers.0.fc1.weight"] = sd["encoder.layers.0.fc1.weight"][:100]
    with pytest.raises(ConversionError) as e:
        _convert(g, state_dict=sd)
    msg = str(e.value)
    assert "encoder.layers.0.self_attn.bias_k" in msg and "unexpected" in msg
    assert "params/layers_1/fc2/bias" in msg and "missing" in msg
    assert "encoder.layers.0.fc1.weight (100, 64)" in msg and "mis-shaped" in msg


def test_converter_checks_the_shared_relative_bias_copies():
    g = _golden("beats_tiny")
    sd = dict(g["state_dict"])
    key = "encoder.layers.1.self_attn.relative_attention_bias.weight"
    sd[key] = sd[key] + 1.0
    with pytest.raises(ConversionError, match=r"failed checks(.|\n)*layers\.1\.self_attn\.relative_attention_bias"):
        _convert(g, state_dict=sd)


def test_weight_norm_is_folded():
    g = _golden("beats_tiny")
    _, variables = _convert(g)
    v, gain = g["state_dict"]["encoder.pos_conv.0.weight_v"], g["state_dict"]["encoder.pos_conv.0.weight_g"]
    with torch.no_grad():  # PyTorch's own weight-norm formula as the reference
        want = torch._weight_norm(torch.from_numpy(v), torch.from_numpy(gain), 2).numpy()
    err = _max_err(variables["params"]["pos_conv"]["kernel"], want.transpose(2, 1, 0))
    assert err <= 1e-6, f"folded kernel: {err:.2e}"


@pytest.mark.parametrize("field,value,needle", [
    ("encoder_layers", 3, "params/layers_2/"),
    ("encoder_embed_dim", 48, "encoder.layers.0.fc1.weight (128, 64)"),
])
def test_config_that_does_not_match_the_weights(field, value, needle):
    g = _golden("beats_tiny")
    cfg = {**g["cfg"], field: value}
    with pytest.raises(ConversionError, match="cannot convert") as e:
        _convert(g, cfg=cfg)
    assert needle in str(e.value)


def test_missing_and_unsupported_cfg_fields():
    cfg = _golden("beats_tiny")["cfg"]
    with pytest.raises(ConversionError, match="num_buckets"):
        config_from_checkpoint({k: v for k, v in cfg.items() if k != "num_buckets"})
    with pytest.raises(ConversionError, match="activation_fn='glu'"):
        config_from_checkpoint({**cfg, "activation_fn": "glu"})


def test_checkpoint_loader_refuses_pickles_unless_allowed(tiny, tmp_path):
    g = tiny[0]
    path = _save_checkpoint(tmp_path / "pickled.pt", g, args=argparse.Namespace(lr=1e-4))
    with pytest.raises(ConversionError, match="allow_pickle"):
        load_beats_checkpoint(path)
    module, variables, labels = load_beats_checkpoint(path, allow_pickle=True)
    assert labels == LABELS and module == tiny[2]
    chex.assert_trees_all_equal(variables, tiny[3])


def test_launcher_end_to_end(tiny, tmp_path):
    """`launch.convert` with `--model=beats` (sizes from the checkpoint's cfg, no --config),
    then `load_pretrained` and compare with the golden outputs."""
    import launch.convert as launcher
    from jaxaudio.convert.hf import load_pretrained

    g, path, module, _, _ = tiny
    summary = launcher.run_hf(path, str(tmp_path / "out"), "beats")
    assert summary["source_tensors"] == len(g["state_dict"]) and summary["model"] == "beats"
    reloaded, variables = load_pretrained(str(tmp_path / "out"))
    assert reloaded == module
    _, model_config = load_converted(str(tmp_path / "out"))
    assert model_config["label_dict"] == {str(k): v for k, v in LABELS.items()}
    features, _, logits = _forward(reloaded, True)(variables, g["wave"], g["padding_mask"])
    err = _max_err(features, g["features"])
    assert err <= TOL, f"features after the launcher: max abs err {err:.2e} > {TOL}"


def test_training_step_with_remat_dropout_and_layerdrop(tiny):
    """Gradients reach every part, the gate's shared query projection included (rng `dropout`)."""
    g, _, module, variables, _ = tiny
    train_model = BEATs(**{**config_from_checkpoint(g["cfg"]), "remat": True, "dropout": 0.1,
                           "attention_dropout": 0.1, "encoder_layerdrop": 0.1, "predictor_dropout": 0.1})
    wave, mask = g["wave"][:, :8000], g["padding_mask"][:, :8000]
    shapes = jax.eval_shape(train_model.init, jax.random.PRNGKey(0), wave, mask)
    chex.assert_trees_all_equal_shapes(nn.unbox(shapes), variables)

    def loss(params, rng):
        features, _, logits = train_model.apply({"params": params}, wave, mask, train=True, return_logits=True,
                                                rngs={"dropout": rng})
        return jnp.mean(features ** 2) + jnp.mean(logits)

    grads = jax.jit(jax.grad(loss))(variables["params"], jax.random.PRNGKey(1))
    chex.assert_tree_all_finite(grads)
    for path in (("layers_0", "self_attn", "query", "kernel"), ("layers_1", "grep_a"),
                 ("relative_attention_bias",), ("pos_conv", "kernel"), ("patch_embedding", "kernel")):
        leaf = functools.reduce(lambda node, k: node[k], path, grads)
        assert float(jnp.max(jnp.abs(leaf))) > 0, f"no gradient for {'/'.join(path)}"
