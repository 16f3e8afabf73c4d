"""LoRA on the converted LLaMA against peft on the transformers LLaMA, same adapter tensors.

peft's `get_peft_model` wraps the transformers model; its B matrices are set to random
values (PEFT initialises them to zero, which would hide every mistake) and saved with
`save_pretrained`. We import that adapter directory, run with `lora(config)`, and compare
logits; then export ours and load it back into peft; merging and an apply-time scale are
compared the same way. Tolerance: fp32, max abs error <= 1e-4.
"""
import numpy as np
import pytest
import torch
from peft_util import peft_with_random_b

from jaxaudio.convert.hf import convert_hf
from jaxaudio.convert.llama import MODULE_NAMES
from jaxaudio.convert.peft import export_peft, import_peft
from jaxaudio.layers.lora import adapted_modules, lora, merge
from jaxaudio.models.llama import Llama

TOL = 1e-4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    variables, config = convert_hf(str(path))
    ids = torch.randint(0, 96, (2, 7))
    return dict(path=path, variables=variables, module=Llama(**config["kwargs"]), ids=ids)


def _peft_model(base, targets, seed, r=4, alpha=8.0):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(base["path"]).eval()
    return peft_with_random_b(model, r=r, alpha=alpha, targets=targets, seed=seed, scale=0.2)


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


def _ours(base, params, config, scale=None):
    with lora(config, scale=scale):
        return np.asarray(base["module"].apply({"params": params}, base["ids"].numpy()))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ALL])
def test_imported_peft_adapter_matches_peft(base, targets, tmp_path):
    peft_model = _peft_model(base, targets, seed=len(targets))
    peft_model.save_pretrained(tmp_path)
    params, config = import_peft(str(tmp_path), base["variables"]["params"], MODULE_NAMES)
    assert len(adapted_modules(params)) == 2 * len(targets)
    assert (config.rank, config.alpha) == (4, 8.0)
    want = _torch_logits(peft_model, base["ids"])
    err = np.abs(_ours(base, params, config) - want).max()
    assert err <= TOL, f"LoRA logits vs peft: max abs err {err:.2e} > {TOL}"
    # The adapters matter: without them the logits differ.
    assert np.abs(_ours(base, params, None) - want).max() > 100 * TOL

    # An apply-time scale equals peft with its `scaling` changed the same way.
    for module in peft_model.modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            module.scaling["default"] = 0.5
    err = np.abs(_ours(base, params, config, scale=0.5) - _torch_logits(peft_model, base["ids"])).max()
    assert err <= TOL, f"scaled LoRA vs peft: max abs err {err:.2e} > {TOL}"


def test_exported_adapter_loads_into_peft(base, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    peft_model = _peft_model(base, ALL, seed=7)
    peft_model.save_pretrained(tmp_path / "theirs")
    params, config = import_peft(str(tmp_path / "theirs"), base["variables"]["params"], MODULE_NAMES)
    export_peft(str(tmp_path / "ours"), params, config, MODULE_NAMES, base_model=str(base["path"]))
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base["path"]).eval(), tmp_path / "ours")
    err = np.abs(_torch_logits(reloaded.eval(), base["ids"]) - _ours(base, params, config)).max()
    assert err <= TOL, f"peft with our exported adapter: max abs err {err:.2e} > {TOL}"


def test_merged_weights_match_peft_merge_and_unload(base, tmp_path):
    peft_model = _peft_model(base, ["q_proj", "v_proj", "o_proj"], seed=3)
    peft_model.save_pretrained(tmp_path)
    params, config = import_peft(str(tmp_path), base["variables"]["params"], MODULE_NAMES)
    merged = merge(params, config.scale)
    assert not adapted_modules(merged)
    want = _torch_logits(peft_model.merge_and_unload(), base["ids"])
    got = np.asarray(base["module"].apply({"params": merged}, base["ids"].numpy()))
    err = np.abs(got - want).max()
    assert err <= TOL, f"merged LoRA vs peft merge_and_unload: max abs err {err:.2e} > {TOL}"


def test_generation_with_adapters_matches_peft_and_takes_the_scale(base, tmp_path):
    """Greedy ids with the adapters equal peft's `generate`; `lora_scale` is an argument of the
    compiled loop (scale 0 gives the base model's ids, not a stale trace)."""
    from jaxaudio.generate import generate
    peft_model = _peft_model(base, ALL, seed=11)
    peft_model.save_pretrained(tmp_path)
    params, config = import_peft(str(tmp_path), base["variables"]["params"], MODULE_NAMES)
    ids = base["ids"][:, :4]
    kw = dict(max_new_tokens=6, eos_token_id=95, pad_token_id=0)
    with torch.no_grad():
        want = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, **kw)[:, 4:]
    got = generate(base["module"], params, input_ids=ids.numpy(), lora=config, **kw).tokens
    np.testing.assert_array_equal(np.asarray(got)[:, :want.shape[1]], want.numpy())
    plain = generate(base["module"], base["variables"]["params"], input_ids=ids.numpy(), **kw).tokens
    off = generate(base["module"], params, input_ids=ids.numpy(), lora=config, lora_scale=0.0, **kw).tokens
    np.testing.assert_array_equal(off, plain)
    assert not np.array_equal(got, plain)
