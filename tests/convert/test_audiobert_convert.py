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
"""
import argparse
import re

import numpy as np
import pytest
import torch
from peft_util import peft_with_random_b

from jaxaudio.convert import ConversionError
from jaxaudio.convert import bert as bert_convert
from jaxaudio.convert.audiobert import export_peft_bert, import_lora_pt, lora_config
from jaxaudio.convert.engine import flatten
from jaxaudio.convert.hf import convert_hf
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
