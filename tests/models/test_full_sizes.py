"""The released sizes, abstractly: every published configuration of each backbone builds
(`jax.eval_shape`, no weights) with exactly the parameter count of the transformers model
of the same config (built on torch's `meta` device, so nothing is allocated).

The configs are written out here (the hub is unreachable) with the published sizes; they
go through the same `config_from_hf` a downloaded `config.json` goes through.
"""
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from jaxaudio.convert.hf import hf_module

WHISPER = {  # d_model, layers, heads, mel bins (ffn = 4 d_model)
    "tiny": (384, 4, 6, 80), "base": (512, 6, 8, 80), "small": (768, 12, 12, 80),
    "medium": (1024, 24, 16, 80), "large-v2": (1280, 32, 20, 80), "large-v3": (1280, 32, 20, 128),
}
LLAMA = {  # hidden, layers, heads, intermediate, vocab
    "llama-2-7b": (4096, 32, 32, 11008, 32000), "vicuna-13b": (5120, 40, 40, 13824, 32000),
    "vicuna-7b-v1.5 + [PAD]": (4096, 32, 32, 11008, 32001),
}


def _ours(name: str, hf_config) -> int:
    mod = hf_module(name)
    module, example = mod.build(mod.config_from_hf(hf_config.to_dict()))
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *example))["params"]
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def _theirs(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", WHISPER)
def test_whisper_encoder_sizes(size):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    d, layers, heads, mels = WHISPER[size]
    cfg = WhisperConfig(d_model=d, encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=4 * d,
                        num_mel_bins=mels, decoder_layers=layers, decoder_attention_heads=heads, decoder_ffn_dim=4 * d)
    with torch.device("meta"):
        want = _theirs(WhisperEncoder(cfg))
    assert _ours("whisper", cfg) == want


@pytest.mark.parametrize("size", LLAMA)
def test_llama_sizes(size):
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden, layers, heads, inter, vocab = LLAMA[size]
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=inter, vocab_size=vocab, rms_norm_eps=1e-5)
    with torch.device("meta"):
        want = _theirs(LlamaForCausalLM(cfg))
    assert _ours("llama", cfg) == want
    if size == "llama-2-7b":
        assert want == 6_738_415_616  # the published count


def test_bert_base_and_ast_base():
    from transformers import ASTConfig, ASTModel, BertConfig, BertModel
    with torch.device("meta"):
        bert, ast = _theirs(BertModel(BertConfig())), _theirs(ASTModel(ASTConfig()))
    assert _ours("bert", BertConfig(architectures=["BertModel"])) == bert == 109_482_240
    assert _ours("ast", ASTConfig()) == ast
