"""AudioBERT's LoRA weights: the original's `*_LORA.pt` against peft on transformers, and the
PEFT export loaded back by peft.

A tiny random `BertForMaskedLM` (weights redrawn at std 0.2 so that every parameter matters)
is saved with `save_pretrained` and converted with `convert_hf`. The same model wrapped by
peft (`LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value"])`, B drawn at
random: peft starts it at zero) is saved as the original saves it: `torch.save` of the
`model.state_dict()` entries whose key contains `lora_`, plus `<module>.bias` where the state
dict has one (its `peft_state_dict(bias="LoRA")`; with peft >= 0.7 there is none). Our `Bert`
with the imported adapters under `lora(config)` must give peft's logits (fp32, max abs
error <= 1e-4).

The whole model (`convert_audiobert`, `launch.convert --model=audiobert`): a tiny random
`BertForMaskedLM`, `ASTForAudioClassification` (its head dropped) and `ASTModel` 24 wide (a
fresh `audio_proj`), a `*_LORA.pt` at the original's rank 64 / alpha 128 made as above, and a
tiny `ClapModel` folder (and its LAION `.pt`, `convert/test_clap_convert.py`'s `to_laion`).
The command line writes OUT and OUT/clap; `load_pretrained(OUT)`'s forward must equal the
torch reference of `tests/models/test_audiobert.py` (the released code's double pass on
transformers + peft; its helpers are reused) and OUT/clap must load as the CLAP. Plus the
errors (one line naming the flag or file) and, with `jax.eval_shape` only, that the
conversion of the real configs fits `AudioBertTask(configs/audiobert.py:pitch)`.
"""
import argparse
import json
import os
import re
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from peft_util import peft_with_random_b

from jaxaudio.convert import ConversionError
from jaxaudio.convert import bert as bert_convert
from jaxaudio.convert.audiobert import (FRESH_ADAPTERS, FRESH_PROJECTION, audiobert_kwargs, build, convert_audiobert,
                                       export_peft_bert, import_lora_pt, lora_config)
from jaxaudio.convert.engine import flatten
from jaxaudio.convert.hf import convert_hf, load_pretrained
from jaxaudio.convert.peft import import_peft
from jaxaudio.layers.lora import adapted_modules, lora
from jaxaudio.models.bert import Bert

TOL = 1e-4
R, ALPHA, LAYERS, VOCAB = 8, 16, 2, 100
TINY = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=32)
Q0 = "base_model.model.bert.encoder.layer.0.attention.self.query"


def _bert_for_mlm(path=None):
    from transformers import BertConfig, BertForMaskedLM
    if path is not None:
        return BertForMaskedLM.from_pretrained(path).eval()
    model = BertForMaskedLM(BertConfig(**TINY)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "LayerNorm.weight" in name else 0.2 * noise)
    return model


def _save_like_original(peft_model, path):
    """The original's checkpoint: the `lora_` entries of the state dict, and for each the
    `<module>.bias` entry if the state dict has one."""
    state = peft_model.state_dict()
    out = {}
    for key, value in state.items():
        if "lora_" in key:
            out[key] = value
            bias = key.split("lora_")[0] + "bias"
            if bias in state:
                out[bias] = state[bias]
    torch.save(out, path)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("bert_mlm")
    _bert_for_mlm().save_pretrained(base_dir)
    variables, config = convert_hf(str(base_dir))
    peft_model = peft_with_random_b(_bert_for_mlm(base_dir), r=R, alpha=ALPHA, targets=["query", "key", "value"],
                                    seed=5, scale=0.2)
    pt = tmp_path_factory.mktemp("weights") / "audio-bert_42_LORA.pt"
    saved = _save_like_original(peft_model, pt)
    ids = np.random.default_rng(0).integers(1, VOCAB, (2, 11))
    with torch.no_grad():
        want = peft_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    return dict(base_dir=base_dir, params=variables["params"], module=Bert(**config["kwargs"]), pt=pt,
                saved={k: v.clone() for k, v in saved.items()}, ids=ids, want=want)


def _ours(setup, params, config):
    with lora(config):
        return np.asarray(setup["module"].apply({"params": params}, setup["ids"]).logits)


def test_original_checkpoint_keys(setup):
    """What peft of today saves: `.default.` in every key, no bias, 2 tensors per q/k/v."""
    keys = sorted(setup["saved"])
    assert len(keys) == LAYERS * 3 * 2
    assert f"{Q0}.lora_A.default.weight" in keys and all(".default." in k for k in keys)
    assert setup["saved"][f"{Q0}.lora_A.default.weight"].shape == (R, 64)


def test_imported_lora_pt_matches_peft(setup):
    params, config = import_lora_pt(str(setup["pt"]), setup["params"], rank=R, alpha=ALPHA)
    assert (config.rank, config.alpha, config.dropout) == (R, ALPHA, 0.01)
    assert adapted_modules(params) == [f"layers_{n}/attention/{m}" for n in range(LAYERS)
                                       for m in ("key", "query", "value")]
    assert params["layers_0"]["attention"]["query"]["lora_a"].shape == (64, R)
    assert params["layers_0"]["attention"]["query"]["lora_b"].shape == (R, 4, 16)
    err = np.abs(_ours(setup, params, config) - setup["want"]).max()
    assert err <= TOL, f"imported LoRA vs peft: max abs err {err:.2e} > {TOL}"
    # the adapters matter
    assert np.abs(_ours(setup, setup["params"], None) - setup["want"]).max() > 100 * TOL


def test_import_into_a_nested_tree_and_variants(setup, tmp_path):
    """Nested under `bert/` (AudioBert's params, beside another encoder); keys without
    `.default.`; PEFT < 0.7's copy of the base bias (checked against ours)."""
    tree = {"bert": setup["params"], "other": setup["params"]}
    nested, _ = import_lora_pt(str(setup["pt"]), tree, rank=R)
    assert adapted_modules(nested) == [f"bert/{m}" for m in adapted_modules(
        import_lora_pt(str(setup["pt"]), setup["params"], rank=R)[0])]

    plain = {k.replace(".default", ""): v for k, v in setup["saved"].items()}
    torch.save(plain, tmp_path / "plain.pt")
    params, config = import_lora_pt(str(tmp_path / "plain.pt"), setup["params"], rank=R, alpha=ALPHA)
    assert np.abs(_ours(setup, params, config) - setup["want"]).max() <= TOL

    bias = np.asarray(setup["params"]["layers_0"]["attention"]["query"]["bias"]).reshape(-1)
    with_bias = {**setup["saved"], f"{Q0}.bias": torch.from_numpy(bias.copy())}
    torch.save(with_bias, tmp_path / "old_peft.pt")
    import_lora_pt(str(tmp_path / "old_peft.pt"), setup["params"], rank=R)
    with_bias[f"{Q0}.bias"] = torch.from_numpy(bias + 0.5)
    torch.save(with_bias, tmp_path / "other_base.pt")
    with pytest.raises(ConversionError, match=r"query\.bias: the base bias .* differs .* another BERT"):
        import_lora_pt(str(tmp_path / "other_base.pt"), setup["params"], rank=R)


def test_export_loads_into_peft(setup, tmp_path):
    from peft import PeftModel
    params, config = import_lora_pt(str(setup["pt"]), setup["params"], rank=R, alpha=ALPHA)
    ours = _ours(setup, params, config)
    keys = export_peft_bert(str(tmp_path / "adapter"), {"bert": params, "ast": {}}, config,
                            base_model=str(setup["base_dir"]))
    assert f"{Q0}.lora_A.weight" in keys and len(keys) == LAYERS * 3 * 2
    reloaded = PeftModel.from_pretrained(_bert_for_mlm(setup["base_dir"]), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = reloaded(input_ids=torch.from_numpy(setup["ids"])).logits.numpy()
    err = np.abs(theirs - ours).max()
    assert err <= TOL, f"peft with our exported adapter: max abs err {err:.2e} > {TOL}"
    # and back through import_peft with BERT's module names: the same tensors
    back, back_config = import_peft(str(tmp_path / "adapter"), setup["params"], bert_convert.MODULE_NAMES)
    assert (back_config.rank, back_config.alpha, back_config.dropout) == (R, ALPHA, 0.01)
    for key, value in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(flatten(back)[key]), np.asarray(value), err_msg=key)


def _broken(setup, tmp_path, edit):
    state = {k: v.clone() for k, v in setup["saved"].items()}
    edit(state)
    path = tmp_path / "broken_LORA.pt"
    torch.save(state, path)
    return str(path)


def _move(state, old, new):
    state[new] = state.pop(old)


@pytest.mark.parametrize("edit,rank,patterns", [
    (lambda s: _move(s, f"{Q0}.lora_A.default.weight", f"{Q0.replace('layer.0', 'layer.99')}.lora_A.default.weight"),
     R, [r"the BERT has no module 'layers_99/attention/query' \(its layers: 0-1\)",
         r"layers_0/attention/query: lora_A is missing"]),
    (lambda s: None, 4, [r"layers_0/attention/query: the adapters have rank 8, not rank=4",
                         r"layers_1/attention/value: the adapters have rank 8"]),
    (lambda s: s.update({f"{Q0}.lora_A.default.weight": torch.zeros(R, 32)}),
     R, [r"layers_0/attention/query: lora_A \(8, 32\) / lora_B \(64, 8\) do not fit kernel \(64, 4, 16\) at rank 8"]),
    (lambda s: [s.pop(k) for k in list(s) if "layer.1.attention.self.value" in k],
     R, [r"layers_1/attention/value: no adapter in the file"]),
    (lambda s: s.update({"base_model.model.bert.embeddings.word_embeddings.weight": torch.zeros(VOCAB, 64)}),
     R, [r"word_embeddings.weight: not a LoRA tensor"]),
    (lambda s: s.update({"base_model.model.bert.encoder.layer.0.output.dense.lora_A.default.weight":
                         torch.zeros(R, 96)}),
     R, [r"output.dense.lora_A.default.weight: not an adapter of a self-attention query/key/value layer"]),
])
def test_errors_list_every_problem(setup, tmp_path, edit, rank, patterns):
    with pytest.raises(ConversionError) as info:
        import_lora_pt(_broken(setup, tmp_path, edit), setup["params"], rank=rank)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_pickled_file_refused_without_allow_pickle(setup, tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({**setup["saved"], "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ConversionError, match="allow_pickle"):
        import_lora_pt(str(path), setup["params"], rank=R)
    with pytest.raises(ConversionError, match="entry 'args' is a Namespace, not a tensor"):
        import_lora_pt(str(path), setup["params"], rank=R, allow_pickle=True)


def test_lora_config_targets_bert_and_audiobert_paths():
    targets = re.compile(lora_config().targets)
    assert targets.fullmatch("layers_3/attention/value") and targets.fullmatch("bert/layers_11/attention/query")
    assert not targets.fullmatch("bert/layers_0/attention/out") and not targets.fullmatch("layers_0/intermediate")
    assert (lora_config().rank, lora_config().alpha, lora_config().dropout) == (64, 128.0, 0.01)


def test_export_refuses_a_wrong_rank_and_no_bert(setup, tmp_path):
    params, config = import_lora_pt(str(setup["pt"]), setup["params"], rank=R)
    with pytest.raises(ConversionError, match=r"the adapters have rank \[8\] but config.rank is 64"):
        export_peft_bert(str(tmp_path / "a"), params, lora_config())
    with pytest.raises(ConversionError, match="found no BERT parameters"):
        export_peft_bert(str(tmp_path / "b"), {"ast": params}, config)


# ---- the whole model: BERT + AST + *_LORA.pt (+ CLAP) -> AudioBert ----------------------------

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Folders and files as a user has them: BERT (MLM), AST with a head, AST 24 wide, a
    BertModel, the original's LoRA file (rank 64, alpha 128), a ClapModel folder and its
    LAION .pt."""
    import transformers

    import models.test_audiobert as ab  # tests/ is on sys.path
    from convert.test_clap_convert import AUDIO, PROJ, TEXT, to_laion  # tiny HTSAT + RoBERTa sizes

    root = tmp_path_factory.mktemp("audiobert_sources")
    paths = {name: str(root / name) for name in ("bert", "ast", "ast24", "bert_model", "clap")}
    ab._randomize(transformers.BertForMaskedLM(transformers.BertConfig(**ab.BERT)), 0).save_pretrained(paths["bert"])
    ast = ab._randomize(transformers.ASTForAudioClassification(
        transformers.ASTConfig(hidden_size=ab.HIDDEN, num_labels=5, **ab.AST_CFG)), 1)
    ast.save_pretrained(paths["ast"])
    transformers.ASTModel(transformers.ASTConfig(hidden_size=24, **ab.AST_CFG)).save_pretrained(paths["ast24"])
    transformers.BertModel(transformers.BertConfig(**ab.BERT)).save_pretrained(paths["bert_model"])
    peft_model = peft_with_random_b(transformers.BertForMaskedLM.from_pretrained(paths["bert"]), r=64, alpha=128,
                                    targets=["query", "key", "value"], seed=4, scale=0.2, dropout=0.01)
    paths["lora"] = str(root / "audio-bert_42_LORA.pt")
    _save_like_original(peft_model, paths["lora"])
    torch.manual_seed(0)
    clap = transformers.ClapModel(transformers.ClapConfig(audio_config={**AUDIO, "enable_fusion": False},
                                                          text_config=TEXT, projection_dim=PROJ)).eval()
    clap.save_pretrained(paths["clap"])
    paths["clap_pt"] = str(root / "630k-best.pt")
    torch.save({"state_dict": to_laion(clap.state_dict(), fusion=False)}, paths["clap_pt"])
    clap_vars, clap_config = convert_hf(paths["clap"])
    return dict(paths=paths, ab=ab, peft=peft_model, ast=ast.audio_spectrogram_transformer, clap_vars=clap_vars,
                clap_sizes=dict(audio=clap_config["kwargs"]["audio"], text=clap_config["kwargs"]["text"],
                                projection_dim=PROJ))


def _one_line_error(fn, *patterns):
    with pytest.raises(ConversionError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for pattern in patterns:
        assert re.search(pattern, msg), (pattern, msg)


def test_command_line_writes_audiobert_and_clap(sources, tmp_path):
    p, ab = sources["paths"], sources["ab"]
    out = tmp_path / "converted"
    cmd = [sys.executable, "-m", "launch.convert", "--model=audiobert", f"--bert={p['bert']}", f"--ast={p['ast']}",
           f"--lora={p['lora']}", f"--clap={p['clap']}", f"--output={out}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "converted audiobert from" in proc.stdout and "converted clap from" in proc.stdout, proc.stdout
    assert f"wrote {out}\n" in proc.stdout and f"wrote {out / 'clap'}" in proc.stdout

    module, variables = load_pretrained(str(out))
    assert type(module).__name__ == "AudioBert" and (module.injection, module.gate) == ("double", "span")
    assert module.lora == dict(ab.DEFAULT_LORA) and module.ast["num_labels"] == 0
    with open(out / "config.json") as f:
        config = json.load(f)
    assert "fresh" not in config and config["sources"]["lora"] == p["lora"]
    assert config["dropped"] == ["params/ast/classifier/bias", "params/ast/classifier/kernel",
                                 "params/ast/classifier_layernorm/bias", "params/ast/classifier_layernorm/scale"]
    # Every span slot filled: gate "span" runs the released code's double pass with LoRA.
    ids, mask, pos, audio = ab._inputs()
    got = jax.jit(lambda v, *x: module.apply(v, *x))(variables, ids, mask, pos, audio)
    parts = {"peft": sources["peft"], "ast": {ab.HIDDEN: (sources["ast"], None, None)}}
    want = ab._torch_double(parts, ids, pos, audio)
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    assert err <= TOL, f"converted AudioBERT vs transformers + peft: max abs err {err:.2e} > {TOL}"

    clap, clap_vars = load_pretrained(str(out / "clap"))
    assert type(clap).__name__ == "Clap" and not clap.audio["enable_fusion"]
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, clap_vars), jax.tree.map(np.asarray, sources["clap_vars"]))


def test_fresh_adapters_and_projection_with_a_laion_clap(sources, tmp_path):
    """No LoRA file and a 24-wide AST: the adapters and audio_proj are declared fresh (the
    trainer's `config.init.checkpoint` keeps their init); the rest is each folder's
    conversion. The CLAP comes from a LAION .pt through run_clap_laion."""
    from launch.convert import run_audiobert
    p = sources["paths"]
    out = tmp_path / "out"
    summary = run_audiobert(p["bert"], p["ast24"], str(out), clap=p["clap_pt"], clap_sizes=sources["clap_sizes"])
    assert summary["model"] == "audiobert" and summary["clap"]["model"] == "clap"
    assert summary["fresh"] == f"{FRESH_ADAPTERS}|{FRESH_PROJECTION}"
    module, variables = load_pretrained(str(out))
    bert_vars, ast_vars = convert_hf(p["bert"])[0], convert_hf(p["ast24"])[0]
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, variables),
                                {"params": {"bert": bert_vars["params"], "ast": ast_vars["params"]}})
    with open(out / "config.json") as f:
        example = build(json.load(f)["kwargs"])[1]
    expected = flatten(nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *example)))
    fresh = re.compile(summary["fresh"])
    assert sorted(set(expected) - set(flatten(variables))) == sorted(k for k in expected if fresh.fullmatch(k))
    assert "params/audio_proj/kernel" in expected and "params/bert/layers_1/attention/key/lora_b" in expected
    clap, clap_vars = load_pretrained(str(out / "clap"))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, clap_vars), jax.tree.map(np.asarray, sources["clap_vars"]))


def test_errors_name_the_flag_or_file(sources, tmp_path):
    from absl import app

    from launch.convert import run_audiobert
    p = sources["paths"]
    out = tmp_path / "out"
    _one_line_error(lambda: convert_audiobert(p["bert_model"], p["ast"]),
                    re.escape(p["bert_model"]), "a BertModel checkpoint", "no masked-LM head", "BertForMaskedLM")
    _one_line_error(lambda: convert_audiobert(p["bert"], p["ast"], p["lora"], lora=dict(rank=8)),
                    re.escape(p["lora"]) + ": its adapters have rank 64, but AudioBERT's LoRA here has rank 8")
    _one_line_error(lambda: convert_audiobert(p["bert"], str(tmp_path / "nope")),
                    re.escape(str(tmp_path / "nope")) + r": no such file or folder \(the AST folder\)")
    _one_line_error(lambda: convert_audiobert(p["ast"], p["ast"]), re.escape(p["ast"]) + ": config.json has "
                    "model_type='audio-spectrogram-transformer'; AudioBERT's language model is a BERT")
    _one_line_error(lambda: run_audiobert(str(tmp_path / "missing"), p["ast"], str(out)),
                    "--bert=.*missing: no such file or folder")
    _one_line_error(lambda: run_audiobert(p["bert"], p["ast"], str(out), lora_pt=str(tmp_path / "x_LORA.pt")),
                    "--lora=.*x_LORA.pt: no such file")
    _one_line_error(lambda: run_audiobert(p["bert"], p["ast"], str(out), clap=p["clap"], enable_fusion=True),
                    "--clap=.*: --enable_fusion was given, but this ClapModel is unfused")
    _one_line_error(lambda: run_audiobert(p["bert"], p["ast"], str(out), clap=p["bert"]),
                    "--clap=.*: config.json has model_type='bert'")
    with pytest.raises(app.UsageError, match="needs --bert .* and --ast"):
        run_audiobert(p["bert"], None, str(out))
    assert not out.exists()  # nothing written on any error


def test_conversion_of_the_original_sizes_fits_the_pitch_task():
    """bert-base-uncased's and MIT/ast-finetuned-audioset-10-10-0.4593's config.json (their
    sizes; no weights): the converted AudioBert has exactly the variables (names, shapes) of
    `AudioBertTask(configs/audiobert.py:pitch)`, and the config's modules are the same."""
    from configs import audiobert as audiobert_config
    from jaxaudio.tasks.audiobert import AudioBertTask

    bert_hf = dict(architectures=["BertForMaskedLM"], model_type="bert", vocab_size=30522, hidden_size=768,
                   num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                   hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
                   type_vocab_size=2, layer_norm_eps=1e-12, position_embedding_type="absolute", pad_token_id=0)
    ast_hf = dict(architectures=["ASTForAudioClassification"], model_type="audio-spectrogram-transformer",
                  hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12,
                  patch_size=16, qkv_bias=True, frequency_stride=10, time_stride=10, max_length=1024,
                  num_mel_bins=128, id2label={str(i): f"label {i}" for i in range(527)})
    kwargs = audiobert_kwargs(bert_hf, ast_hf)
    module, example = build(kwargs)
    task = AudioBertTask(audiobert_config.get_config("pitch"))
    ours = module.parts()
    theirs = task.model.parts()
    assert ours[0] == theirs[0] and ours[1] == theirs[1]  # the same Bert and AST
    assert (module.lora, module.injection, module.gate) == (task.model.lora, task.model.injection, task.model.gate)

    def shapes(tree):
        return {k: tuple(v.shape) for k, v in flatten(nn.unbox(tree)).items()}

    converted = shapes(jax.eval_shape(module.init, jax.random.PRNGKey(0), *example))
    trained = shapes(jax.eval_shape(task.init_variables, jax.random.PRNGKey(0)))
    assert converted == trained
    assert "params/audio_proj/kernel" not in trained  # 768 = 768: no projection, nothing fresh but the adapters
    assert len([k for k in trained if k.endswith("/lora_a")]) == 36
