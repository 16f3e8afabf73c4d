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

from jaxaudio.convert.engine import flatten
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


def _count(tree) -> int:
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(tree))


def _beats_iter3_count() -> int:
    """BEATs iter3+ (no predictor), counted by hand from the original's module list
    (reference/salmonn_beats.md §5): patch conv, LayerNorm, post_extract_proj, the
    weight-normed positional conv (folded to one kernel) and 12 layers with gated
    relative position bias; the bias table is shared (counted once)."""
    d, ffn, layers, heads = 768, 3072, 12, 12
    layer = 4 * (d * d + d) + (64 * 8 + 8) + heads + 2 * 2 * d + (d * ffn + ffn) + (ffn * d + d)
    return (512 * 16 * 16 + 2 * 512 + 512 * d + d + d * (d // 16) * 128 + d + 2 * d + 320 * heads
            + layers * layer)


def test_salmonn_7b_layout_and_parameter_count():
    """configs/salmonn_7b.py's model, abstractly (no weights): a 30 s clip and a prompt give
    logits over [BOS + prompt head][88 audio tokens][prompt tail + answer]; each part's
    parameter count equals the original's: transformers' Whisper encoder (large-v2),
    `Blip2QFormerModel` (exactly SALMONN's speech Q-Former once its text parts are
    dropped: 22,837,248), `LlamaForCausalLM` (Vicuna-7B), BEATs counted by hand, and
    LoRA r 8 on q/v of 32 layers."""
    import jax.numpy as jnp
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, LlamaConfig, LlamaForCausalLM, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from configs import salmonn_7b
    from jaxaudio.tasks.salmonn import PARTS, SCALARS
    from jaxaudio.tasks.audio_llm import model_kwargs
    from jaxaudio.models.salmonn import Salmonn

    module = Salmonn(**model_kwargs(salmonn_7b.get_config().model, PARTS, SCALARS))
    wave = jax.ShapeDtypeStruct((1, 30 * 16000), jnp.float32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    prefix, suffix = jax.ShapeDtypeStruct((1, 6), jnp.int32), jax.ShapeDtypeStruct((1, 40), jnp.int32)
    params = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), wave, lengths, prefix, suffix))["params"]
    logits = jax.eval_shape(lambda p, *args: module.apply({"params": p}, *args), params, wave, lengths, prefix, suffix)
    assert logits.shape == (1, 6 + 88 + 40, 32000) and module.tokens_per_chunk() == 88

    with torch.device("meta"):
        whisper = _theirs(WhisperEncoder(WhisperConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                                                       encoder_ffn_dim=5120, num_mel_bins=80)))
        qformer = _theirs(Blip2QFormerModel(Blip2QFormerConfig(
            hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
            cross_attention_frequency=1, encoder_hidden_size=2048)))
        vicuna = _theirs(LlamaForCausalLM(LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                                      num_key_value_heads=32, intermediate_size=11008,
                                                      vocab_size=32000)))
    lora = 32 * 2 * (4096 * 8 + 8 * 4096)
    connector = qformer + 768 + (768 * 4096 + 4096) + 2 * 1280 + 2 * 768  # + query, proj, ln_speech, ln_audio
    llm = flatten(params["llm"])
    ours = {"whisper": _count(params["whisper"]), "beats": _count(params["beats"]),
            "connector": _count(params["connector"]), "llm": sum(int(np.prod(v.shape)) for k, v in llm.items()
                                                                 if "lora_" not in k),
            "lora": sum(int(np.prod(v.shape)) for k, v in llm.items() if "lora_" in k)}
    theirs = {"whisper": whisper, "beats": _beats_iter3_count(), "connector": connector, "llm": vicuna, "lora": lora}
    table = "\n".join(f"{k:<10}{ours[k]:>15,}{theirs[k]:>15,}" for k in ours)
    print(f"\nSALMONN-7B parameters (ours, original):\n{table}\ntotal     {sum(ours.values()):>15,}"
          f"{sum(theirs.values()):>15,}\ntrainable {ours['connector'] + ours['lora']:>15,}")
    assert ours == theirs, table
    assert qformer == 22_837_248 and ours["connector"] + ours["lora"] == 30_186_240
