"""AudioBERT against PyTorch: transformers `BertForMaskedLM` + peft LoRA + `ASTModel` with the
injection written out in torch here, and golden outputs of the ORIGINAL code.

Parity (fp32, max abs error <= 1e-4): tiny random BERT and AST checkpoints (`save_pretrained`)
converted with `convert_hf`; the LoRA adapter made by peft (`LoraConfig(r=4, lora_alpha=8,
lora_dropout=0.01, target_modules=["query", "key", "value"])`, random non-zero B:
`tests/peft_util.py`), saved with `save_pretrained` and imported with `import_peft` +
`jaxaudio.convert.bert.MODULE_NAMES`. The torch side computes the audio vector as the mean of
`ASTModel(...).last_hidden_state` over all tokens, then
- "double" (the released code): `model.bert.embeddings(input_ids)`, span rows overwritten,
  `model(inputs_embeds=...)` without an attention mask;
- "single": `model.bert.embeddings.word_embeddings(input_ids)`, overwritten, then
  `model(inputs_embeds=..., attention_mask=...)`;
- gate "span": an example without spans equals plain `BertForMaskedLM(input_ids,
  attention_mask)` (no LoRA, no injection); the others are the double pass with LoRA;
- AST 24 wide, BERT 32 wide: `nn.Linear(24, 32)` on the vector (`audio_proj`).

Golden (`tests/golden/audiobert_pitch_tiny.npz`): HJ-Ok/AudioBERT at 4fc71ae,
`model/AudioBERT/sound_pitch/model.py` (`AK_BERT`) with its own `QA_dataset` and
`dynamic_padding_collate_fn` (span positions, with both fallbacks: span1 not found -> 0, span2
not found -> the last token), run locally on a tiny seeded BertForMaskedLM + ASTModel; how it
was made is in `tests/golden/recipe.py` (AUDIOBERT_PITCH_TINY). Its weights are converted
here with the same converters and the logits compared (plus the loss and the lower/higher
predictions recomputed from ours). The animal twin (`animal_sound/model.py`) does not run at
HEAD: it injects `expanded_mean_audio_embs_1`, which it never defines. Its intended path
(one span, `expanded_mean_audio_embs` at `span_token_pos`) is the pitch path with one slot
instead of two; the pitch golden covers the shared code (double embedding pass, overwrite,
no mask, peft LoRA on query/key/value, AST mean), and S = 1 has its own torch parity test
(`test_one_slot_as_the_animal_task`).

Plus: shapes (chex) with and without jit, `audio_vectors` instead of audio, train mode with
dropout, the gradient reaching AST through the injection, logical axes, and input errors.
"""
import dataclasses
import functools
import json
import os

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from peft_util import peft_with_random_b
from safetensors.numpy import save_file

from jaxaudio.convert.bert import MODULE_NAMES
from jaxaudio.convert.hf import convert_hf
from jaxaudio.convert.peft import import_peft
from jaxaudio.layers import DEFAULT_RULES
from jaxaudio.models.audiobert import DEFAULT_LORA, AudioBert

TOL = 1e-4
GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden", "audiobert_pitch_tiny.npz")
# The golden's sizes, so that the faithful model compiles once for both tests.
B, L, S, VOCAB, HIDDEN, FRAMES, MELS = 4, 19, 2, 43, 32, 48, 32
BERT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu")
AST_CFG = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_length=FRAMES,
               num_mel_bins=MELS, patch_size=16, frequency_stride=10, time_stride=10)
QKV = ["query", "key", "value"]
BERT_KW = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=2, num_heads=4, intermediate_size=64,
               max_position_embeddings=64)
AST_KW = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_length=FRAMES, num_mel_bins=MELS)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """std-0.2 weights everywhere, LayerNorm scales around 1 (HF's 0.02 init hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = ("LayerNorm" in name or "layernorm" in name) and name.endswith("weight")
            p.copy_((1.0 if is_scale else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Torch models and their conversions: BERT (+ peft LoRA), AST 32 and 24 wide, Linear 24 -> 32."""
    root = tmp_path_factory.mktemp("audiobert")
    bert = _randomize(transformers.BertForMaskedLM(transformers.BertConfig(**BERT)), 0)
    bert.save_pretrained(root / "bert")
    asts = {}
    for width, seed in ((HIDDEN, 1), (24, 2)):
        ast = _randomize(transformers.ASTModel(transformers.ASTConfig(hidden_size=width, **AST_CFG)), seed)
        ast.save_pretrained(root / f"ast{width}")
        variables, config = convert_hf(str(root / f"ast{width}"))
        asts[width] = (ast, variables["params"], config["kwargs"])
    torch.manual_seed(3)
    peft_model = peft_with_random_b(transformers.BertForMaskedLM.from_pretrained(root / "bert"), r=4, alpha=8.0,
                                    targets=QKV, seed=4, scale=0.2, dropout=0.01)
    peft_model.save_pretrained(root / "adapter")
    bert_vars, bert_cfg = convert_hf(str(root / "bert"))
    bert_params, lora_cfg = import_peft(str(root / "adapter"), bert_vars["params"], MODULE_NAMES)
    linear = torch.nn.Linear(24, HIDDEN)
    with torch.no_grad():
        linear.weight.copy_(0.2 * torch.randn(linear.weight.shape, generator=torch.Generator().manual_seed(5)))
    proj = {"kernel": linear.weight.detach().numpy().T, "bias": linear.bias.detach().numpy()}
    return dict(bert=bert, peft=peft_model, ast=asts, linear=linear, proj=proj, bert_params=bert_params,
                bert_kwargs=bert_cfg["kwargs"], lora=dataclasses.asdict(lora_cfg))


def _module(parts, ast_width=HIDDEN, **kw) -> AudioBert:
    kw.setdefault("lora", parts["lora"])
    return AudioBert(bert=parts["bert_kwargs"], ast=parts["ast"][ast_width][2], **kw)


def _variables(parts, ast_width=HIDDEN):
    params = {"bert": parts["bert_params"], "ast": parts["ast"][ast_width][1]}
    if ast_width != HIDDEN:
        params["audio_proj"] = parts["proj"]
    return {"params": params}


@functools.lru_cache(maxsize=None)
def _forward(module: AudioBert):
    """One jitted forward per module configuration (weights are arguments)."""
    return jax.jit(lambda v, ids, mask, pos, audio: module.apply(v, ids, mask, pos, audio))


def _inputs(seed=0, positions=((3, 9), (1, 14), (0, 10), (16, 16))):
    """Right-padded ids (lengths 19, 15, 11, 17), masks, positions (a shared one: the later slot
    wins), random AST input [B, S, FRAMES, MELS]."""
    rng = np.random.default_rng(seed)
    lengths = np.array([L, 15, 11, 17])
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask, rng.integers(5, VOCAB, (B, L)), 0)
    ids[:, 0] = 2
    ids[np.arange(B), lengths - 1] = 3
    audio = rng.standard_normal((B, S, FRAMES, MELS)).astype(np.float32)
    return ids, mask, np.asarray(positions, np.int32), audio


def _torch_vectors(parts, audio, ast_width=HIDDEN):
    with torch.no_grad():
        x = torch.from_numpy(audio.reshape((-1,) + audio.shape[2:]))
        v = parts["ast"][ast_width][0](input_values=x).last_hidden_state.mean(dim=1)
        if ast_width != HIDDEN:
            v = parts["linear"](v)
    return v.reshape(audio.shape[0], audio.shape[1], -1)


def _torch_inject(x, positions, vectors):
    for s in range(positions.shape[1]):
        for i in range(positions.shape[0]):
            if positions[i, s] >= 0:
                x[i, int(positions[i, s])] = vectors[i, s]
    return x


def _torch_double(parts, ids, positions, audio, ast_width=HIDDEN):
    """The released code's injection: embeddings, overwritten, then inputs_embeds, no mask."""
    model = parts["peft"]
    with torch.no_grad():
        x = model.bert.embeddings(input_ids=torch.from_numpy(ids))
        x = _torch_inject(x, positions, _torch_vectors(parts, audio, ast_width))
        return model(inputs_embeds=x).logits.numpy()


def _torch_single(parts, ids, mask, positions, audio):
    model = parts["peft"]
    with torch.no_grad():
        x = model.bert.embeddings.word_embeddings(torch.from_numpy(ids))
        x = _torch_inject(x, positions, _torch_vectors(parts, audio))
        return model(inputs_embeds=x, attention_mask=torch.from_numpy(mask)).logits.numpy()


def _err(got, want, what):
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    print(f"{what}: max abs error {err:.3g}")
    assert err <= TOL, f"{what}: max abs error {err:.3g} > {TOL}"
    return err


# ---- parity against transformers + peft ----------------------------------------------------

def test_double_pass_matches_torch(parts):
    module = _module(parts, injection="double", gate="always")
    ids, mask, pos, audio = _inputs()
    got = _forward(module)(_variables(parts), ids, mask, pos, audio)
    chex.assert_shape(got, (B, L, VOCAB))
    _err(got, _torch_double(parts, ids, pos, audio), "double pass (released code) vs torch")
    # Everything matters: the adapters, the audio, the second embedding pass, the missing mask.
    no_lora = _module(parts, lora=None, gate="always")
    assert np.abs(_forward(no_lora)(_variables(parts), ids, mask, pos, audio) - got).max() > 1e-2
    assert np.abs(_forward(module)(_variables(parts), ids, mask, pos, audio[::-1].copy()) - got).max() > 1e-2
    single = _forward(_module(parts, injection="single", gate="always"))(_variables(parts), ids, mask, pos, audio)
    assert np.abs(single - got).max() > 1e-2


def test_single_pass_with_mask_matches_torch(parts):
    module = _module(parts, injection="single", gate="always")
    ids, mask, pos, audio = _inputs(seed=1)
    got = _forward(module)(_variables(parts), ids, mask, pos, audio)
    _err(got, _torch_single(parts, ids, mask, pos, audio), "single pass with mask vs torch")


def test_span_gate_runs_examples_without_spans_as_plain_bert(parts):
    """Row 1 has no span: plain BertForMaskedLM(input_ids, attention_mask). Rows 2 and 3 have
    one slot at -1 (one span, as the animal task): only the other slot is injected."""
    module = _module(parts, injection="double", gate="span")
    positions = ((3, 9), (-1, -1), (5, -1), (-1, 7))
    ids, mask, pos, audio = _inputs(seed=2, positions=positions)
    got = np.asarray(_forward(module)(_variables(parts), ids, mask, pos, audio))
    with torch.no_grad():
        plain = parts["bert"](input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    _err(got[1], plain[1], "gate span, no span vs plain BertForMaskedLM")
    want = _torch_double(parts, ids, pos, audio)
    rows = [0, 2, 3]
    _err(got[rows], want[rows], "gate span, with spans (one or two slots) vs torch double pass")
    # The gate matters: with "always" the span-less row goes through LoRA and the double pass.
    always = np.asarray(_forward(_module(parts, gate="always"))(_variables(parts), ids, mask, pos, audio))
    _err(always, want, "gate always with -1 slots vs torch double pass")
    assert np.abs(always[1] - plain[1]).max() > 1e-2


def test_one_slot_as_the_animal_task(parts):
    """S = 1 (animal: one span, one clip) against the same torch double pass."""
    module = _module(parts, injection="double", gate="always")
    ids, mask, pos, audio = _inputs(seed=4, positions=((3,), (1,), (0,), (16,)))
    got = _forward(module)(_variables(parts), ids, mask, pos, audio[:, :1])
    _err(got, _torch_double(parts, ids, pos, audio[:, :1]), "one slot (animal) vs torch double pass")


def test_linear_projection_when_widths_differ(parts):
    module = _module(parts, ast_width=24, injection="double", gate="always")
    ids, mask, pos, audio = _inputs(seed=3)
    variables = _variables(parts, ast_width=24)
    got = _forward(module)(variables, ids, mask, pos, audio)
    _err(got, _torch_double(parts, ids, pos, audio, ast_width=24), "AST 24 -> Linear -> BERT 32 vs torch")
    vec = module.apply(variables, audio[:, 0], method=AudioBert.audio_vector)
    chex.assert_shape(vec, (B, HIDDEN))
    _err(vec, _torch_vectors(parts, audio[:, :1], ast_width=24)[:, 0].numpy(), "audio_vector with Linear")
    # Precomputed vectors are AST's (24 wide): the Linear still applies, as in a cached run.
    pooled = module.apply(variables, audio.reshape(B * S, FRAMES, MELS), method=AudioBert.ast_vector)
    chex.assert_shape(pooled, (B * S, 24))
    from_vectors = module.apply(variables, ids, mask, pos, audio_vectors=pooled.reshape(B, S, 24))
    np.testing.assert_allclose(from_vectors, got, atol=1e-5)


# ---- the original code's golden outputs ----------------------------------------------------

def _golden_variables(golden, tmp_path):
    """The npz's state dict -> HF folders for BERT and AST + a PEFT adapter folder, converted."""
    state = {k[len("state/"):]: golden[k] for k in golden.files if k.startswith("state/")}
    lm = "language_enc.base_model.model."
    bert = {k[len(lm):].replace(".base_layer.", "."): v for k, v in state.items()
            if k.startswith(lm) and "lora_" not in k}
    adapter = {k[len("language_enc."):]: v for k, v in state.items() if "lora_" in k}
    ast = {k[len("audio_enc."):]: v for k, v in state.items() if k.startswith("audio_enc.")}
    assert len(bert) + len(adapter) + len(ast) == len(state)
    for name, tensors, config in (("bert", bert, "bert_config"), ("ast", ast, "ast_config"),
                                  ("adapter", adapter, None)):
        os.makedirs(tmp_path / name)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                  str(tmp_path / name / ("adapter_model.safetensors" if config is None else "model.safetensors")))
        with open(tmp_path / name / ("adapter_config.json" if config is None else "config.json"), "w") as f:
            f.write(str(golden["lora_config" if config is None else config]))
    bert_vars, bert_cfg = convert_hf(str(tmp_path / "bert"))
    ast_vars, ast_cfg = convert_hf(str(tmp_path / "ast"))
    bert_params, lora_cfg = import_peft(str(tmp_path / "adapter"), bert_vars["params"], MODULE_NAMES)
    module = AudioBert(bert=bert_cfg["kwargs"], ast=ast_cfg["kwargs"], lora=dataclasses.asdict(lora_cfg),
                       injection="double", gate="always")
    return module, {"params": {"bert": bert_params, "ast": ast_vars["params"]}}


def test_original_pitch_model_golden(parts, tmp_path):
    golden = np.load(GOLDEN)
    module, variables = _golden_variables(golden, tmp_path)
    assert module == _module(parts, injection="double", gate="always")  # one compile for both tests
    ids, pos = golden["input_ids"], golden["first_token_pos"]
    audio = np.stack([golden["audio_1"], golden["audio_2"]], axis=1)
    assert (ids == 0).any() and (pos[:, 0] == 0).any()  # padding attended to; a span-1 fallback
    got = np.asarray(_forward(module)(variables, ids, golden["attention_mask"], pos, audio))
    _err(got, golden["logits"], "golden logits of the original AK_BERT (sound_pitch)")
    swapped = _forward(module)(variables, ids, golden["attention_mask"], pos, audio[:, ::-1].copy())
    assert np.abs(swapped - got).max() > 1e-2  # the golden depends on which clip goes where
    # BertForMaskedLM's loss over every position (labels are never -100 there) and the
    # lower/higher argmax at [MASK].
    logp = jax.nn.log_softmax(got.astype(np.float64), axis=-1)
    loss = -np.take_along_axis(np.asarray(logp), golden["labels"][..., None], axis=-1).mean()
    assert abs(loss - float(golden["loss"])) <= TOL, (loss, float(golden["loss"]))
    vocab = [str(v) for v in golden["vocab"]]
    lower, higher = vocab.index("lower"), vocab.index("higher")
    at_mask = got[ids == vocab.index("[MASK]")]
    pred = np.where(at_mask[:, [lower, higher]].argmax(-1) == 0, lower, higher)
    np.testing.assert_array_equal(pred, golden["predicted_token_id"])


# ---- shapes, training, gradients, axes, errors ---------------------------------------------

@pytest.fixture(scope="module")
def fresh():
    """A fresh init of the default-gate model (32-wide AST, no projection)."""
    module = AudioBert(bert=dict(BERT_KW), ast=AST_KW, lora=dict(DEFAULT_LORA, rank=4))
    ids, mask, pos, audio = _inputs()
    variables = module.init(jax.random.PRNGKey(0), ids, mask, pos, audio)
    return module, variables




@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_shapes(fresh, use_jit):
    module, boxed = fresh
    variables = nn.unbox(boxed)
    ids, mask, pos, audio = _inputs()
    out = (_forward(module)(variables, ids, mask, pos, audio) if use_jit
           else module.apply(variables, ids, mask, pos, audio))
    chex.assert_shape(out, (B, L, VOCAB))
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite(out)
    vectors = module.apply(variables, audio.reshape(B * S, FRAMES, MELS), method=AudioBert.audio_vector)
    chex.assert_shape(vectors, (B * S, HIDDEN))
    # Precomputed vectors give the same logits as the audio.
    from_vectors = module.apply(variables, ids, mask, pos, audio_vectors=vectors.reshape(B, S, HIDDEN))
    np.testing.assert_allclose(from_vectors, out, atol=1e-5)
    flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
    assert "audio_proj/kernel" not in flat and "bert/layers_1/attention/value/lora_b" in flat


def test_parameters_have_logical_axes(parts):
    module = _module(parts, ast_width=24)
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), *_inputs())["params"]
    assert boxed["audio_proj"]["kernel"].names == ("embed", "mlp")
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    nn.logical_to_mesh(nn.get_partition_spec(boxed), DEFAULT_RULES)


def test_train_mode_dropout(fresh):
    module, boxed = fresh
    variables = nn.unbox(boxed)
    x = _inputs()
    ref = module.apply(variables, *x)
    a = module.apply(variables, *x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = module.apply(variables, *x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    chex.assert_shape(a, (B, L, VOCAB))
    assert not np.allclose(a, ref) and not np.allclose(a, b)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        module.apply(variables, *x, train=True)


def test_gradient_reaches_ast_and_adapters(parts):
    """The original trains AST through the injection (and LoRA): both get gradients."""
    module = _module(parts, gate="span")
    ids, mask, pos, audio = _inputs(positions=((3, 9), (-1, -1), (5, -1), (-1, 7)))

    def loss(params):
        return jnp.mean(module.apply({"params": params}, ids, mask, pos, audio) ** 2)

    grads = jax.jit(jax.grad(loss))(_variables(parts)["params"])
    assert float(jnp.abs(grads["ast"]["patch_embeddings"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["bert"]["layers_0"]["attention"]["query"]["lora_b"]).max()) > 0


def test_frozen_ast_is_a_constant_of_the_clip(parts):
    """`freeze_ast`: no gradient reaches AST, its dropout is off in training (so the vector
    of a clip can be computed once), and the adapters and projection still train."""
    ast = dict(parts["ast"][24][2], dropout=0.3)
    module = AudioBert(bert=parts["bert_kwargs"], ast=ast, lora=parts["lora"], gate="span", freeze_ast=True)
    ids, mask, pos, audio = _inputs(positions=((3, 9), (-1, -1), (5, -1), (-1, 7)))
    variables = _variables(parts, ast_width=24)

    def loss(params, rng):
        return jnp.mean(module.apply({"params": params}, ids, mask, pos, audio, train=True,
                                     rngs={"dropout": rng}) ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"], jax.random.PRNGKey(3))
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["ast"]))
    assert float(jnp.abs(grads["audio_proj"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["bert"]["layers_0"]["attention"]["query"]["lora_b"]).max()) > 0
    flat = audio.reshape(B * S, FRAMES, MELS)
    vectors = [module.apply(variables, flat, train=True, rngs={"dropout": jax.random.PRNGKey(k)},
                            method=AudioBert.ast_vector) for k in (1, 2)]
    np.testing.assert_array_equal(vectors[0], vectors[1])
    np.testing.assert_allclose(vectors[0], module.apply(variables, flat, method=AudioBert.ast_vector), atol=1e-6)
    trained = AudioBert(bert=parts["bert_kwargs"], ast=ast, lora=parts["lora"])  # the same AST, not frozen
    drawn = [trained.apply(variables, flat, train=True, rngs={"dropout": jax.random.PRNGKey(k)},
                           method=AudioBert.ast_vector) for k in (1, 2)]
    assert not np.allclose(drawn[0], drawn[1])


def test_input_errors(fresh):
    module, boxed = fresh
    variables = nn.unbox(boxed)
    ids, mask, pos, audio = _inputs()
    vectors = np.zeros((B, S, HIDDEN), np.float32)
    with pytest.raises(ValueError, match="exactly one of audio"):
        module.apply(variables, ids, mask, pos, audio, vectors)
    with pytest.raises(ValueError, match="exactly one of audio"):
        module.apply(variables, ids, mask, pos)
    with pytest.raises(ValueError, match=r"audio must be \[batch, spans, frames, mel\] = \[4, 3"):
        module.apply(variables, ids, mask, np.zeros((B, 3), np.int32), audio)
    with pytest.raises(ValueError, match=r"span_positions must be \[batch, spans\] = \[4, S\]"):
        module.apply(variables, ids, mask, pos[:2], audio)
    with pytest.raises(ValueError, match=r"audio_vectors must be \[batch, spans, ast hidden\] = \[4, 2, 32\]"):
        module.apply(variables, ids, mask, pos, audio_vectors=vectors[..., :8])
    bad = pos.copy()
    bad[2, 1] = L
    with pytest.raises(ValueError, match=r"span_positions\[2, 1\] = 19 is outside \[-1, 19\)"):
        module.apply(variables, ids, mask, bad, audio)
    bad[2, 1] = -2
    with pytest.raises(ValueError, match=r"span_positions\[2, 1\] = -2 is outside"):
        module.apply(variables, ids, mask, bad, audio)
    # Under jit the values are not known: that example's logits are NaN, the others are not.
    bad[2, 1] = L
    out = np.asarray(_forward(module)(variables, ids, mask, bad, audio))
    assert np.isnan(out[2]).all() and np.isfinite(out[[0, 1, 3]]).all()
    with pytest.raises(ValueError, match="injection='triple'"):
        AudioBert(bert=BERT_KW, ast=AST_KW, injection="triple").init(
            jax.random.PRNGKey(0), ids, mask, pos, audio)
    with pytest.raises(ValueError, match="head 'mlm'"):
        AudioBert(bert=dict(BERT_KW, head="none"), ast=AST_KW).init(
            jax.random.PRNGKey(0), ids, mask, pos, audio)
    assert json.dumps(module.lora)  # the fields stay json-serialisable (hash, configs)
