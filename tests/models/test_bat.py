"""BAT: Spatial-AST -> Q-Former projector -> LLaMA with LoRA, and the converter of its three parts.

Tiny sizes: the Spatial-AST of configs/spatial_ast_tiny.py with one block (128 wide), a
projector with hidden 64, 2 layers, 4 queries, a LLaMA with hidden 48, 2 layers, vocab 64,
LoRA r 8 / alpha 32 on q_proj and v_proj. The three sources are built with the ORIGINAL
key names and shapes:
  - Spatial-AST `finetuned.pth`: `original_state_dict` (tests/convert), `torch.save`d under 'model';
  - BAT `model.pt`: SLAM-LLM's `EncoderProjectorQFormer` (a transformers `Blip2QFormerModel`
    plus query/linear/norm, random O(1) weights) as `encoder_projector.*`, and the LoRA
    tensors of a peft model (`llm.base_model.model.model.layers.N.self_attn.{q,v}_proj.
    lora_{A,B}.default.weight`, B random instead of zero);
  - LLaMA: a transformers `LlamaForCausalLM` (weights redrawn at O(1) scale), save_pretrained.
Parity: our converted `Bat` against the torch composition [projector(encoder tokens)]
[embeddings of BOS + prompt + answer + EOS] through the peft LLaMA, fp32, max abs error
<= 1e-4. The encoder's own parity is tested in tests/models/test_spatial_ast*.py, so the
torch side starts from our encoder tokens.
"""
import functools
import json
import os
import shutil
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from ml_collections import ConfigDict
from peft_util import peft_with_random_b  # tests/ is on sys.path

from configs import spatial_ast_tiny
from convert.test_spatial_ast_convert import original_state_dict  # tests/ is on sys.path
from jaxaudio.convert import ConversionError, flatten
from jaxaudio.convert.bat import build, convert_bat, load_bat
from jaxaudio.layers import DEFAULT_RULES
from jaxaudio.models.audio_llm import IGNORE, build_sequence, text_loss
from jaxaudio.models.bat import PROMPT, Bat, answer
from jaxaudio.models.spatial_ast import SpatialAST
from jaxaudio.train.optim import trainable_mask

TOL = 1e-4
# The original encoder's architecture (1-channel stem, no IPD statistics) at the tiny sizes.
ENC = {**{k: v for k, v in spatial_ast_tiny.get_config().model.to_dict().items() if k not in ("dtype", "param_dtype")},
       "stem_channels": 1, "normalize_ipd": False}
ENC["depth"] = 1
PROJ = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, num_queries=4)
Q, WIDTH, VOCAB = 4, 48, 64
BOS, EOS, PAD = 1, 2, 0
BATCH, SAMPLES, MAX_LEN = 2, 16000, 12
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12]]
ANSWERS = [[20, 21, 22], [30, 31, 32, 33]]
TRAINABLE = r".*(projector|lora_[ab]).*"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- the three original checkpoints -----------------------------------------------------------

class _TorchProjector(torch.nn.Module):
    """SLAM-LLM's `EncoderProjectorQFormer`: queries -> Blip2QFormerModel -> Linear -> LayerNorm."""

    def __init__(self):
        super().__init__()
        cfg = transformers.Blip2QFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=128, cross_attention_frequency=2,
                                              encoder_hidden_size=ENC["embed_dim"])
        self.query = torch.nn.Parameter(torch.zeros(1, Q, 64))
        self.qformer = transformers.Blip2QFormerModel(cfg)
        self.linear = torch.nn.Linear(64, WIDTH)
        self.norm = torch.nn.LayerNorm(WIDTH, eps=1e-5)

    def forward(self, x):
        query = self.query.expand(x.shape[0], -1, -1)
        atts = torch.ones(x.shape[:-1], dtype=torch.long)
        out = self.qformer(query_embeds=query, encoder_hidden_states=x, encoder_attention_mask=atts)
        return self.norm(self.linear(out.last_hidden_state))


def _redraw(model: torch.nn.Module, seed: int) -> None:
    """O(1) activations: norm scales 1 + 0.1 N, biases 0.1 N, matrices N / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(noise if name == "query" else noise / np.sqrt(p.shape[-1]))


def _peft_llama(path: str):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    _redraw(llama, 1)
    llama.save_pretrained(path)
    return peft_with_random_b(llama, r=8, alpha=32, dropout=0.05, targets=["q_proj", "v_proj"], seed=2, scale=0.3)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("bat")
    paths = {"spatial_ast": str(root / "finetuned.pth"), "bat": str(root / "model.pt"), "llama": str(root / "llama")}
    encoder_sd = original_state_dict(SpatialAST(**ENC), seed=5)
    torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in encoder_sd.items()}, "epoch": 9},
               paths["spatial_ast"])
    projector = _TorchProjector().eval()
    _redraw(projector, 3)
    llm = _peft_llama(paths["llama"])
    bat_sd = {f"encoder_projector.{k}": v for k, v in projector.state_dict().items()}
    bat_sd.update({f"llm.{k}": v for k, v in llm.state_dict().items() if "lora_" in k})
    torch.save(bat_sd, paths["bat"])
    return dict(paths=paths, root=root, projector=projector, llm=llm, encoder_sd=encoder_sd,
                bat_sd={k: v.numpy() for k, v in bat_sd.items()})


@pytest.fixture(scope="module")
def bat(sources):
    variables, config = convert_bat(*sources["paths"].values(), encoder=ENC, projector=PROJ)
    module = build(config["kwargs"])[0]
    return module, variables, config


@functools.lru_cache(maxsize=None)
def _jitted(module: Bat):
    """The forward (`lora_scale` traced: alpha / r = 4 by default) and (encoder tokens, audio
    embeddings), compiled once for every test."""
    forward = jax.jit(lambda v, wave, ids, mask, scale: module.apply(v, wave, ids, mask, lora_scale=scale))
    encode = jax.jit(lambda v, wave: module.apply(
        v, wave, method=lambda m, w: (m.encoder_module(w)["tokens"], m.encode_audio(w))))
    return forward, encode


def _forward(module: Bat):
    return lambda v, wave, ids, mask, scale=4.0: _jitted(module)[0](v, wave, ids, mask, scale)


def _wave(seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((BATCH, 2, SAMPLES))).astype(np.float32)


def _text(prompts=PROMPTS, answers=ANSWERS):
    rows = [build_sequence(p, a, BOS, EOS, MAX_LEN, PAD) for p, a in zip(prompts, answers)]
    return tuple(np.stack(x) for x in zip(*rows))


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---- the model ------------------------------------------------------------------------------

def test_converted_bat_matches_torch(sources, bat):
    module, variables, config = bat
    assert config["model"] == "bat" and config["kwargs"]["llm"]["hidden_size"] == WIDTH
    assert config["source_tensors"] == len(sources["encoder_sd"]) + len(sources["bat_sd"]) + 3 + 9 * 2
    wave = _wave()
    ids, mask, _ = _text()
    tokens, audio = _jitted(module)[1](variables, wave)
    chex.assert_shape(tokens, (BATCH, 3 + 128, ENC["embed_dim"]))
    with torch.no_grad():
        audio_t = sources["projector"](torch.tensor(np.asarray(tokens)))
        llm = sources["llm"]
        embeds = torch.cat([audio_t, llm.get_input_embeddings()(torch.from_numpy(ids).long())], dim=1)
        full_mask = torch.cat([torch.ones(BATCH, Q, dtype=torch.long), torch.from_numpy(mask).long()], dim=1)
        want = llm(inputs_embeds=embeds, attention_mask=full_mask).logits.numpy()
    err = _max_err(audio, audio_t.numpy())
    print(f"BAT audio embeddings vs torch projector: max abs error {err:.3g} (tolerance {TOL})")
    assert err <= TOL, f"audio embeddings vs torch projector: max abs error {err:.3g} > {TOL}"
    got = np.asarray(_forward(module)(variables, wave, ids, mask))
    chex.assert_shape(got, (BATCH, Q + MAX_LEN, VOCAB))
    valid = full_mask.numpy().astype(bool)  # padded positions differ only in their (unused) rotary position
    err = _max_err(got[valid], want[valid])
    print(f"BAT logits vs torch (peft LLaMA on projector embeddings): max abs error {err:.3g} (tolerance {TOL})")
    assert err <= TOL, f"BAT logits vs torch: max abs error {err:.3g} > tolerance {TOL}"
    assert float(np.std(want[valid])) > 0.5  # not a degenerate forward
    # The adapters are in use: LoRA off (scale 0) changes the text logits.
    off = _forward(module)(variables, wave, ids, mask, 0.0)
    assert _max_err(np.asarray(off)[valid], want[valid]) > 100 * TOL


def test_shapes_with_and_without_jit_and_logical_axes(bat):
    module, variables, _ = bat
    wave = _wave(1)
    ids, mask, _ = _text()
    eager = module.apply(variables, wave, ids, mask)
    chex.assert_shape(eager, (BATCH, Q + MAX_LEN, VOCAB))
    chex.assert_type(eager, jnp.float32)
    jitted = _forward(module)(variables, wave, ids, mask)
    chex.assert_trees_all_close(jitted, eager, atol=1e-5)
    tokens, audio = _jitted(module)[1](variables, wave)
    chex.assert_shape(audio, (BATCH, Q, WIDTH))
    chex.assert_shape(tokens, (BATCH, 3 + 128, ENC["embed_dim"]))
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), *build(bat[2]["kwargs"])[1])
    names = {n for rule in DEFAULT_RULES for n in rule[:1]}
    boxes = jax.tree_util.tree_flatten_with_path(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in boxes:
        assert isinstance(leaf, nn.Partitioned) and set(leaf.names) <= names, jax.tree_util.keystr(path)
    chex.assert_trees_all_equal_shapes(nn.unbox(boxed), variables)


def test_audio_embeddings_come_before_the_text(bat):
    module, variables, _ = bat
    fwd, wave = _forward(module), _wave()
    ids, mask, _ = _text()
    base = np.asarray(fwd(variables, wave, ids, mask))
    other_ids = np.where(mask == 1, (ids + 7) % VOCAB, ids)
    text_changed = np.asarray(fwd(variables, wave, other_ids, mask))
    # Causal: the audio positions (first Q) see no text; every text position sees the audio.
    assert _max_err(text_changed[:, :Q], base[:, :Q]) == 0.0
    assert _max_err(text_changed[:, Q:], base[:, Q:]) > 1e-2
    audio_changed = np.asarray(fwd(variables, _wave(7), ids, mask))
    for t in range(Q, Q + MAX_LEN):
        assert _max_err(audio_changed[:, t], base[:, t]) > 1e-4, f"position {t} does not see the audio"


def test_build_sequence():
    ids, mask, labels = build_sequence([5, 6, 7], [20, 21], BOS, EOS, 9, PAD)
    np.testing.assert_array_equal(ids, [BOS, 5, 6, 7, 20, 21, EOS, PAD, PAD])
    np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(labels, [IGNORE] * 4 + [20, 21, EOS] + [IGNORE] * 2)
    ids, mask, labels = build_sequence([5, 6, 7], [20, 21], BOS, EOS, 5)  # cut inside the answer
    np.testing.assert_array_equal(ids, [BOS, 5, 6, 7, 20])
    np.testing.assert_array_equal(labels, [IGNORE] * 4 + [20])
    assert ids.dtype == mask.dtype == labels.dtype == np.int32
    assert PROMPT.format(question="Where is the dog?").endswith("### Instruction:\nWhere is the dog?\n\n### Response:")


def test_loss_counts_only_the_answer_and_eos(bat):
    module, variables, _ = bat
    ids, mask, labels = _text()
    logits = np.asarray(_forward(module)(variables, _wave(), ids, mask))
    loss, count = text_loss(jnp.asarray(logits), jnp.asarray(labels))
    assert int(count) == sum(len(a) + 1 for a in ANSWERS)
    # By hand: logits at sequence position Q + t - 1 predict text token t.
    ce = []
    for b, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        for t in range(1 + len(p), 1 + len(p) + len(a) + 1):
            row = logits[b, Q + t - 1].astype(np.float64)
            ce.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[b, t]])
    assert abs(float(loss) - np.mean(ce)) < 1e-5
    # Positions before the answer (audio, BOS, prompt) do not count, whatever their logits or tokens.
    noisy = logits.copy()
    for b, p in enumerate(PROMPTS):
        noisy[b, :Q + len(p)] += np.random.default_rng(b).standard_normal(noisy[b, :Q + len(p)].shape) * 5
    assert float(text_loss(jnp.asarray(noisy), jnp.asarray(labels))[0]) == pytest.approx(float(loss), abs=1e-6)
    other_prompts = [[(t + 11) % VOCAB for t in p] for p in PROMPTS]
    _, _, other_labels = _text(other_prompts)
    np.testing.assert_array_equal(other_labels, labels)
    # An answer token does count.
    _, _, changed = _text(answers=[[20, 21, 23], ANSWERS[1]])
    assert abs(float(text_loss(jnp.asarray(logits), jnp.asarray(changed))[0]) - float(loss)) > 1e-3


def test_gradients_reach_only_projector_and_lora(bat):
    module, variables, _ = bat
    ids, mask, labels = _text()
    wave, params = _wave(), variables["params"]
    trainable = trainable_mask(ConfigDict(dict(trainable=TRAINABLE, frozen="")), params)

    def loss(p):  # training mode (dropout on), frozen parameters masked as the trainer's train_step does
        p = jax.tree.map(lambda t, x: x if t else jax.lax.stop_gradient(x), trainable, p)
        logits = module.apply({"params": p, "batch_stats": variables["batch_stats"]}, wave, ids, mask,
                              deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
        return text_loss(logits, labels)[0]

    grads = jax.jit(jax.grad(loss))(params)
    train = {k for k, t in flatten(trainable).items() if t}
    assert train == {k for k in flatten(params) if k.startswith("projector/") or "/lora_" in k}
    assert any("/lora_a" in k for k in train) and any(k.startswith("projector/qformer/") for k in train)
    for path, g in flatten(grads).items():
        norm = float(jnp.abs(g).sum())
        assert (norm > 0) == (path in train), f"{path}: gradient {norm:.3g}, trainable={path in train}"

    # The encoder is frozen inside the model too (stop_gradient), whatever the optimizer masks.
    def audio_sum(encoder):
        v = {"params": {**params, "encoder": encoder}, "batch_stats": variables["batch_stats"]}
        return module.apply(v, wave, method=Bat.encode_audio).sum()

    encoder_grads = jax.jit(jax.grad(audio_sum))(params["encoder"])
    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(encoder_grads))


def test_answer_decodes_from_left_padded_prefixes(bat):
    module, variables, _ = bat
    wave = _wave(2)
    out = answer(module, variables, wave, PROMPTS, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                 num_beams=1, max_new_tokens=3)
    chex.assert_shape(out.tokens, (BATCH, 3))
    assert out.tokens.dtype == jnp.int32
    # The first token of each row is the full model's argmax after [audio][BOS + its own prompt].
    ids, mask, _ = _text(answers=[[], []])
    ids, mask = np.where(ids == EOS, PAD, ids), np.where(ids == EOS, 0, mask)
    logits = np.asarray(_forward(module)(variables, wave, ids, mask))
    first = [int(np.argmax(logits[b, Q + len(p)])) for b, p in enumerate(PROMPTS)]
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], first)
    beams = answer(module, variables, wave, PROMPTS, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                   num_beams=2, max_new_tokens=3)
    chex.assert_shape(beams.tokens, (BATCH, 3))


# ---- the converter --------------------------------------------------------------------------

def test_converter_places_every_part(sources, bat):
    _, variables, _ = bat
    p, sd = variables["params"], sources["bat_sd"]
    np.testing.assert_array_equal(p["projector"]["query"], sd["encoder_projector.query"][0])
    a = sd["llm.base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight"]
    b = sd["llm.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"]
    np.testing.assert_array_equal(p["llm"]["layers_1"]["attn"]["value"]["lora_a"], a.T)
    np.testing.assert_array_equal(p["llm"]["layers_1"]["attn"]["value"]["lora_b"].reshape(8, -1), b.T)
    np.testing.assert_array_equal(variables["batch_stats"]["encoder"]["frontend"]["bn"]["mean"],
                                  sources["encoder_sd"]["bn.running_mean"])
    np.testing.assert_array_equal(p["encoder"]["cls_tokens"], sources["encoder_sd"]["cls_tokens"][0])
    assert sorted(p["llm"]["layers_0"]["attn"]["key"]) == ["kernel"]  # LoRA only where BAT put it


def _save_variant(sources, tmp_path, name, edit):
    path = str(tmp_path / name)
    if name == "llama":
        shutil.copytree(sources["paths"]["llama"], path)
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        edit(cfg)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f)
    else:
        sd = dict(sources["bat_sd"] if name == "model.pt" else sources["encoder_sd"])
        edit(sd)
        torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, path)
    return path


def _convert(sources, **paths):
    return convert_bat(*{**sources["paths"], **paths}.values(), encoder=ENC, projector=PROJ)


def test_converter_names_missing_and_unexpected_keys(sources, tmp_path):
    lora = "llm.base_model.model.model.layers.{}.self_attn.{}_proj.lora_{}.default.weight"

    def edit_bat(sd):
        del sd[lora.format(1, "v", "B")]
        sd[lora.format(0, "k", "A")] = np.zeros((8, WIDTH), np.float32)

    bat_path = _save_variant(sources, tmp_path, "model.pt", edit_bat)
    enc_path = _save_variant(sources, tmp_path, "finetuned.pth", lambda sd: sd.pop("blocks.0.attn.qkv.bias"))
    with pytest.raises(ConversionError) as e:
        _convert(sources, bat=bat_path, spatial_ast=enc_path)
    msg = str(e.value)
    assert "params/encoder/blocks_0/attn/qkv/bias" in msg  # Spatial-AST: missing
    assert "params/llm/layers_1/attn/value/lora_b" in msg  # BAT: missing adapter
    assert lora.format(0, "k", "A") in msg and "no such variable" in msg  # BAT: adapter the config does not target


def test_converter_rejects_a_llama_config_that_does_not_fit(sources, tmp_path):
    wide = _save_variant(sources, tmp_path, "llama", lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(ConversionError) as e:
        _convert(sources, llama=wide)
    assert "params/layers_2/attn/query/kernel" in str(e.value)  # no layer 2 in the weights
    assert "params/llm/layers_2/attn/query/lora_a" in str(e.value)  # nor in BAT's adapters
    shutil.rmtree(wide)
    wide = _save_variant(sources, tmp_path, "llama", lambda c: c.update(hidden_size=64))
    with pytest.raises(ConversionError, match=r"model\.embed_tokens\.weight \(64, 48\) -> params/embed_tokens"):
        _convert(sources, llama=wide)
    shutil.rmtree(wide)
    missing = _save_variant(sources, tmp_path, "llama", lambda c: c.pop("rms_norm_eps"))
    with pytest.raises(ConversionError, match="'rms_norm_eps' is missing"):
        _convert(sources, llama=missing)
    with pytest.raises(ConversionError, match="no such file"):
        _convert(sources, bat=str(tmp_path / "nope.pt"))


def test_converter_stores_bfloat16_parameters(sources, bat):
    variables, config = convert_bat(*sources["paths"].values(), encoder=ENC, projector=PROJ, dtype="bfloat16")
    assert config["dtype"] == "bfloat16"
    assert {str(a.dtype) for a in jax.tree.leaves(variables["params"])} == {"bfloat16"}
    assert {str(a.dtype) for a in jax.tree.leaves(variables["batch_stats"])} == {"float32"}  # statistics stay exact
    want = bat[1]["params"]["llm"]["layers_0"]["attn"]["query"]["lora_b"]
    got = variables["params"]["llm"]["layers_0"]["attn"]["query"]["lora_b"]
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2)


def test_launcher_round_trip(sources, bat, tmp_path):
    from launch.convert import run_bat

    module, variables, _ = bat
    out = str(tmp_path / "converted")
    summary = run_bat(*sources["paths"].values(), out, encoder=ENC, projector=PROJ)
    assert summary["model"] == "bat"
    assert summary["collections"] == {k: len(jax.tree.leaves(v)) for k, v in variables.items()}
    loaded_module, loaded = load_bat(out)
    assert loaded_module == module
    chex.assert_trees_all_equal(loaded, variables)
    from jaxaudio.convert.hf import load_pretrained  # the generic loader knows BAT too
    assert load_pretrained(out)[0] == module
    wave, (ids, mask, _) = _wave(), _text()
    chex.assert_trees_all_equal(_forward(module)(loaded, wave, ids, mask), _forward(module)(variables, wave, ids, mask))


# ---- the released sizes ---------------------------------------------------------------------

def test_full_size_layout_has_the_reference_trainable_counts():
    """ViT-B Spatial-AST, 8-layer Q-Former with 64 queries, LLaMA-2 7B with LoRA r 8 on q/v:
    Q-Former 66.21M, projection 3.16M, LoRA 4.19M (reference §4: 73.56M trainable)."""
    module, example = build({"llm": dict(rms_norm_eps=1e-5)})
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *example))["params"]

    def count(tree, keep=lambda k: True) -> int:
        return sum(int(np.prod(v.shape)) for k, v in flatten(tree).items() if keep(k))

    proj = shapes["projector"]
    assert count(proj["qformer"]) + count(proj["query"]) == 66_209_280
    assert count(proj["linear"]) + count(proj["norm"]) == 3_158_016
    assert count(shapes["llm"], lambda k: "/lora_" in k) == 4_194_304 == 32 * 2 * (4096 * 8 + 8 * 4096)
    assert count(shapes["llm"], lambda k: "/lora_" not in k) == 6_738_415_616  # LLaMA-2 7B
    assert proj["query"].shape == (64, 768) and proj["linear"]["kernel"].shape == (768, 4096)
    mask = trainable_mask(ConfigDict(dict(trainable=TRAINABLE, frozen="")), shapes)
    trainable = sum(int(np.prod(v.shape)) for v, t in zip(jax.tree.leaves(shapes), jax.tree.leaves(mask)) if t)
    assert trainable == 73_561_600


def test_command_line_converts_with_the_original_sizes(sources, tmp_path):
    """`python -m launch.convert --model=bat` takes the three parts and sizes the encoder and
    projector as the original: the tiny checkpoints are refused, naming what does not fit."""
    paths = sources["paths"]
    cmd = [sys.executable, "-m", "launch.convert", "--model=bat", f"--bat={paths['bat']}", f"--source={paths['bat']}",
           f"--spatial_ast={paths['spatial_ast']}", f"--llama={paths['llama']}", f"--output={tmp_path / 'out'}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "encoder_projector.linear.weight (48, 64) -> params/projector/linear/kernel expects (768, 48)" in proc.stderr
    assert "params/encoder/blocks_11/attn/qkv/kernel (768, 3, 12, 64)" in proc.stderr
    assert not (tmp_path / "out").exists()
