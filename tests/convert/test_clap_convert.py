"""The original LAION-CLAP checkpoint layout (`630k-audioset-fusion-best.pt` and kin).

The originals cannot be downloaded here, so each test file is made from a tiny random HF
`ClapModel` (fused and unfused) by the inverse of the renames in reference/clap.md §1 (and
of transformers' `convert_clap_original_pytorch_to_hf.py`): `text_model` -> `text_branch`,
`audio_model.audio_encoder` -> `audio_branch` with htsat.py's names (`bn0`, `norm1`/`norm2`,
`attn.qkv` fused `[3d, d]`, `attn.proj`, `mlp.fc1`/`fc2`), `*_projection.linear{1,2}` ->
`.{0,2}`, every key under `module.`, the whole under `state_dict`, plus the tensors LAION
has and the model drops (STFT / mel front end, AudioSet head, tscam conv, attn_mask
buffers, `*_transform` MLPs, position_ids). `convert_laion` must give exactly the variables
`convert_hf` gives for the HF folder.
"""
import re

import chex
import jax
import numpy as np
import pytest
import torch
import transformers

from jaxaudio.convert import ConversionError
from jaxaudio.convert.clap import convert_laion
from jaxaudio.convert.hf import convert_hf, load_pretrained

AUDIO = dict(spec_size=64, num_mel_bins=16, patch_embeds_hidden_size=16, depths=[2, 2], num_attention_heads=[2, 4],
             window_size=4, hidden_size=32)
TEXT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40)
PROJ = 16

AUDIO_RENAMES = [  # HF -> LAION, inside audio blocks
    (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.self\.relative_position_", ".attn.relative_position_"),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."), (r"\.output\.dense\.", ".mlp.fc2."),
]


def to_laion(hf_state: dict[str, torch.Tensor], fusion: bool) -> dict[str, torch.Tensor]:
    """HF `ClapModel.state_dict()` -> the LAION training checkpoint's `state_dict`."""
    out, qkv = {}, {}
    for key, value in hf_state.items():
        if key.startswith("text_model."):
            key = "text_branch." + key[len("text_model."):]
        elif key.startswith("audio_model.audio_encoder."):
            key = "audio_branch." + key[len("audio_model.audio_encoder."):]
            key = key.replace("audio_branch.batch_norm.", "audio_branch.bn0.")
            if m := re.fullmatch(r"(.*)\.attention\.self\.(query|key|value)\.(weight|bias)", key):
                qkv.setdefault((m[1], m[3]), {})[m[2]] = value
                continue
            if ".blocks." in key:
                for pattern, new in AUDIO_RENAMES:
                    key = re.sub(pattern, new, key)
        else:
            key = re.sub(r"_projection\.linear1\.", "_projection.0.", key)
            key = re.sub(r"_projection\.linear2\.", "_projection.2.", key)
        out[key] = value
    for (block, kind), parts in qkv.items():
        out[f"{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    g = torch.Generator().manual_seed(9)
    extra = {"audio_branch.spectrogram_extractor.stft.conv_real.weight": (513, 1, 1024),
             "audio_branch.spectrogram_extractor.stft.conv_imag.weight": (513, 1, 1024),
             "audio_branch.logmel_extractor.melW": (513, 16), "audio_branch.head.weight": (527, 527),
             "audio_branch.head.bias": (527,), "audio_branch.tscam_conv.weight": (527, 32, 2, 3),
             "audio_branch.tscam_conv.bias": (527,)}
    for side in ("text", "audio"):
        for i in (0, 3):
            extra[f"{side}_transform.sequential.{i}.weight"] = (PROJ, PROJ)
            extra[f"{side}_transform.sequential.{i}.bias"] = (PROJ,)
    out.update({k: torch.randn(shape, generator=g) for k, shape in extra.items()})
    for s in range(len(AUDIO["depths"])):  # htsat.py registers a mask buffer in every block (None when unshifted)
        out[f"audio_branch.layers.{s}.blocks.1.attn_mask"] = torch.zeros(16 // 4 ** s, 16, 16)  # windows of 16 tokens
    assert any("mel_conv2d" in k for k in out) == fusion
    return {f"module.{k}": v for k, v in out.items()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"fused"|"unfused": (HF save_pretrained dir, LAION .pt file, LAION state dict)}."""
    out = {}
    for seed, fusion in enumerate((False, True)):
        torch.manual_seed(seed)
        cfg = transformers.ClapConfig(audio_config={**AUDIO, "enable_fusion": fusion}, text_config=TEXT,
                                      projection_dim=PROJ)
        model = transformers.ClapModel(cfg).eval()
        with torch.no_grad():  # non-trivial tables and statistics, so a mix-up would show
            for name, b in model.named_buffers():
                if name.endswith(("running_mean", "running_var")):
                    b.copy_(torch.rand(b.shape) + 0.5)
            for name, p in model.named_parameters():
                if name.endswith("relative_position_bias_table"):
                    p.normal_()
        name = "fused" if fusion else "unfused"
        directory = tmp_path_factory.mktemp(f"hf_clap_{name}")
        model.save_pretrained(directory)
        state = to_laion(model.state_dict(), fusion)
        path = directory / "630k-audioset-best.pt"
        torch.save({"epoch": 45, "name": "laion-clap", "state_dict": state}, path)
        out[name] = (directory, path, state)
    return out


@pytest.fixture(scope="module")
def hf_converted(checkpoints):
    return {name: convert_hf(str(d)) for name, (d, _, _) in checkpoints.items()}


def _sizes(hf_config):
    return dict(audio=hf_config["kwargs"]["audio"], text=hf_config["kwargs"]["text"], projection_dim=PROJ)


@pytest.mark.parametrize("name", ["unfused", "fused"])
def test_laion_layout_converts_to_the_hf_variables(checkpoints, hf_converted, name):
    _, path, _ = checkpoints[name]
    want, hf_config = hf_converted[name]
    variables, config = convert_laion(str(path), enable_fusion=name == "fused", **_sizes(hf_config))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, variables), jax.tree.map(np.asarray, want))
    assert config["model"] == "clap" and config["source_format"] == "laion"
    assert config["kwargs"]["audio"] == hf_config["kwargs"]["audio"]


def test_loaded_state_dict_and_launcher(checkpoints, hf_converted, tmp_path):
    from launch.convert import run_clap_laion
    _, path, state = checkpoints["fused"]
    want, hf_config = hf_converted["fused"]
    variables, _ = convert_laion({"state_dict": state}, enable_fusion=True, **_sizes(hf_config))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, variables), jax.tree.map(np.asarray, want))
    summary = run_clap_laion(str(path), str(tmp_path / "out"), True, **_sizes(hf_config))
    assert summary["model"] == "clap" and summary["source_tensors"] == len(state)
    module, loaded = load_pretrained(str(tmp_path / "out"))
    assert module.audio == hf_config["kwargs"]["audio"]
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, want))


def test_missing_and_extra_keys_are_named(checkpoints, hf_converted):
    _, _, state = checkpoints["unfused"]
    sizes = _sizes(hf_converted["unfused"][1])
    broken = dict(state)
    del broken["module.audio_branch.layers.1.blocks.0.norm2.weight"]
    broken["module.audio_branch.layers.1.blocks.0.attn.extra.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError) as e:
        convert_laion(broken, enable_fusion=False, **sizes)
    msg = str(e.value)
    assert re.search(r"missing variables[\s\S]*params/audio/layers_1_blocks_0/norm2/scale", msg), msg
    assert re.search(r"unexpected keys[\s\S]*module\.audio_branch\.layers\.1\.blocks\.0\.attn\.extra\.weight", msg)


def test_fusion_setting_must_match_the_checkpoint(checkpoints, hf_converted):
    """LAION-AI/CLAP#113: a fused checkpoint loaded as unfused (or the reverse)."""
    with pytest.raises(ConversionError, match=r"enable_fusion=False[\s\S]*mel_conv2d[\s\S]*CLAP#113"):
        convert_laion(checkpoints["fused"][2], enable_fusion=False, **_sizes(hf_converted["fused"][1]))
    with pytest.raises(ConversionError, match=r"enable_fusion=True[\s\S]*unfused model[\s\S]*CLAP#113"):
        convert_laion(checkpoints["unfused"][2], enable_fusion=True, **_sizes(hf_converted["unfused"][1]))
