"""SALMONN's converter: four original checkpoints -> one `Salmonn` (jaxaudio.convert.salmonn).

The four sources are built with the ORIGINAL key names and shapes, at tiny sizes:
  - Whisper: a transformers `WhisperModel` (d_model 16, 1 encoder layer, 100 positions =
    2 s), save_pretrained;
  - BEATs: `{"cfg", "model", "label_dict"}` from `tests/golden/beats_tiny.npz` (the
    original's state dict and cfg: encoder width 64), torch.save;
  - Vicuna: a transformers `LlamaForCausalLM` (hidden 40, 2 layers, vocab 64), save_pretrained;
  - salmonn_v1.pth: `{"model": ...}` with the state dict of `tests/golden/salmonn_qformer_tiny.npz`
    (`speech_Qformer.bert.*`, `speech_query_tokens` [1, 1, 64], `speech_llama_proj` 64 -> 40,
    the cross-attention reading 16 + 64 = 80 features), `ln_speech`/`ln_audio` redrawn at
    the widths of this Whisper and BEATs, the Q-Former text parts SALMONN drops (word and
    position embeddings, text FFN, `cls`), and the LoRA tensors of a peft model on the tiny
    LLaMA (r 4, B non-zero) renamed `llama_model.base_model.model.model.layers.N...`.
Numerical parity of the model against the original SALMONN code is tested elsewhere; here
every variable must hold its source tensor, and a forward pass of the converted model runs.
"""
import argparse
import functools
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from absl import app
from peft_util import peft_with_random_b

from jaxaudio.convert import ConversionError, flatten, save_converted
from jaxaudio.convert.beats import convert_checkpoint
from jaxaudio.convert.hf import convert_hf, load_pretrained
from jaxaudio.convert.salmonn import convert_salmonn, load_salmonn
from jaxaudio.models.salmonn import DEFAULT_LORA

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEECH, AUDIO, HIDDEN, LLM, VOCAB, RANK = 16, 64, 64, 40, 64, 4
SIZES = dict(connector={"num_heads": 4}, chunk_seconds=2.0)  # the heads are not in the checkpoint
LORA = "llama_model.base_model.model.model.layers.{}.self_attn.{}_proj.lora_{}.default.weight"
BATCH, SAMPLES = 2, 40000  # 2.5 s: two chunks of 2 s


def _whisper(path: str) -> None:
    cfg = transformers.WhisperConfig(vocab_size=100, num_mel_bins=80, d_model=SPEECH, encoder_layers=1,
                                     encoder_attention_heads=2, encoder_ffn_dim=32, decoder_layers=1,
                                     decoder_attention_heads=2, decoder_ffn_dim=32, max_source_positions=100,
                                     max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=1)
    torch.manual_seed(0)
    transformers.WhisperModel(cfg).save_pretrained(path)


def _peft_llama(path: str) -> dict[str, np.ndarray]:
    """Save the tiny LLaMA; return its peft LoRA tensors (B non-zero) under SALMONN's names."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=LLM, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(1)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    llama.save_pretrained(path)
    model = peft_with_random_b(llama, r=RANK, alpha=32, dropout=0.1, targets=["q_proj", "v_proj"], seed=2, scale=0.3)
    out = {f"llama_model.{k}": v.numpy().copy() for k, v in model.state_dict().items() if "lora_" in k}
    assert len(out) == 2 * 2 * 2 and LORA.format(1, "v", "B") in out
    return out


def _text_parts() -> dict[str, np.ndarray]:
    """The LAVIS Q-Former's text parts that SALMONN sets to None (tiny: vocab 100, 32 positions)."""
    rng = np.random.default_rng(7)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    bert = "speech_Qformer.bert."
    out = {bert + "embeddings.word_embeddings.weight": r(100, HIDDEN),
           bert + "embeddings.position_embeddings.weight": r(32, HIDDEN),
           "speech_Qformer.cls.predictions.bias": r(100),
           "speech_Qformer.cls.predictions.transform.dense.weight": r(HIDDEN, HIDDEN),
           "speech_Qformer.cls.predictions.transform.dense.bias": r(HIDDEN),
           "speech_Qformer.cls.predictions.transform.LayerNorm.weight": r(HIDDEN),
           "speech_Qformer.cls.predictions.transform.LayerNorm.bias": r(HIDDEN),
           "speech_Qformer.cls.predictions.decoder.weight": r(100, HIDDEN),
           "speech_Qformer.cls.predictions.decoder.bias": r(100)}
    for i in range(2):
        layer = f"{bert}encoder.layer.{i}."
        out.update({layer + "intermediate.dense.weight": r(128, HIDDEN), layer + "intermediate.dense.bias": r(128),
                    layer + "output.dense.weight": r(HIDDEN, 128), layer + "output.dense.bias": r(HIDDEN),
                    layer + "output.LayerNorm.weight": r(HIDDEN), layer + "output.LayerNorm.bias": r(HIDDEN)})
    return out


def _torch_save(path, obj) -> str:
    def to_torch(x):
        return {k: to_torch(v) for k, v in x.items()} if isinstance(x, dict) else (
            torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x)
    torch.save(to_torch(obj), path)
    return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("salmonn")
    paths = {"whisper": str(root / "whisper"), "beats": str(root / "beats.pt"), "vicuna": str(root / "vicuna"),
             "salmonn": str(root / "salmonn_v1.pth")}
    _whisper(paths["whisper"])
    g = np.load(os.path.join(GOLDEN, "beats_tiny.npz"))
    beats_sd = {k[len("state_dict/"):]: g[k] for k in g.files if k.startswith("state_dict/")}
    _torch_save(paths["beats"], {"cfg": json.loads(str(g["cfg"])), "model": beats_sd, "label_dict": {0: "/m/09x0r"}})
    lora = _peft_llama(paths["vicuna"])
    q = np.load(os.path.join(GOLDEN, "salmonn_qformer_tiny.npz"))
    trained = {k[3:]: q[k] for k in q.files if k.startswith("sd.")}
    rng = np.random.default_rng(3)
    for name, width in (("ln_speech", SPEECH), ("ln_audio", AUDIO)):  # the golden's encoders are 48 and 32 wide
        trained[f"{name}.weight"] = (1 + 0.1 * rng.standard_normal(width)).astype(np.float32)
        trained[f"{name}.bias"] = (0.1 * rng.standard_normal(width)).astype(np.float32)
    salmonn_sd = {**trained, **_text_parts(), **lora}
    _torch_save(paths["salmonn"], {"model": salmonn_sd})
    return dict(paths=paths, root=root, beats_sd=beats_sd, salmonn_sd=salmonn_sd)


def _convert(sources, **kw):
    paths = {**sources["paths"], **{k: v for k, v in kw.items() if k in sources["paths"]}}
    options = {**SIZES, **{k: v for k, v in kw.items() if k not in sources["paths"]}}
    return convert_salmonn(paths["whisper"], paths["beats"], paths["vicuna"], paths["salmonn"], **options)


@pytest.fixture(scope="module")
def converted(sources):
    return _convert(sources)


def _variant(sources, tmp_path, edit, name="salmonn_v1.pth", wrap=lambda sd: {"model": sd}) -> str:
    sd = dict(sources["salmonn_sd"])
    edit(sd)
    return _torch_save(tmp_path / name, wrap(sd))


@functools.lru_cache(maxsize=None)
def _forward(module):
    return jax.jit(lambda v, wave, lengths, prefix, suffix: module.apply(v, wave, lengths, prefix, suffix))


# ---- the converted variables ----------------------------------------------------------------

def test_every_variable_holds_its_source_tensor(sources, converted):
    variables, config = converted
    kw = config["kwargs"]
    assert config["model"] == "salmonn" and config["dtype"] == "float32"
    # Sizes: the connector from salmonn_v1.pth's tensors, LoRA rank from the adapters.
    assert kw["connector"] == dict(num_queries=1, hidden_size=HIDDEN, num_layers=2, intermediate_size=128,
                                   num_heads=4)
    assert kw["lora"] == {**DEFAULT_LORA, "rank": RANK} and kw["chunk_seconds"] == 2.0
    assert kw["whisper"]["d_model"] == SPEECH and kw["beats"]["encoder_embed_dim"] == AUDIO
    assert kw["llm"]["hidden_size"] == LLM and kw["llm"]["vocab_size"] == VOCAB  # the directory's vocabulary
    p, sd = variables["params"], sources["salmonn_sd"]

    # Each part equals that source converted alone, in its place (every variable is compared).
    whisper = convert_hf(sources["paths"]["whisper"], "whisper")
    llm = convert_hf(sources["paths"]["vicuna"], "llama")
    beats, _ = convert_checkpoint(sources["paths"]["beats"])
    chex.assert_trees_all_equal(p["whisper"], whisper[0]["params"])
    chex.assert_trees_all_equal(p["beats"], beats["params"])
    chex.assert_trees_all_equal({k: v for k, v in flatten(p["llm"]).items() if "/lora_" not in k},
                                flatten(llm[0]["params"]))
    n_beats, n_salmonn = len(sources["beats_sd"]), len(sd)
    assert config["source_tensors"] == whisper[1]["source_tensors"] + n_beats + n_salmonn + llm[1]["source_tensors"]
    assert set(flatten(p)) == {f"whisper/{k}" for k in flatten(whisper[0]["params"])} | {
        f"beats/{k}" for k in flatten(beats["params"])} | {f"llm/{k}" for k in flatten(llm[0]["params"])} | {
        f"llm/layers_{i}/attn/{m}/lora_{ab}" for i in range(2) for m in ("query", "value") for ab in "ab"} | {
        f"connector/{k}" for k in flatten(p["connector"])}
    # The golden's 62 SALMONN tensors but the `position_ids` buffer, each in its own variable.
    assert len(flatten(p["connector"])) == 61

    # Against the raw tensors, after the layout transforms.
    a, b = sd[LORA.format(1, "v", "A")], sd[LORA.format(1, "v", "B")]  # [r, in], [out, r]
    value = p["llm"]["layers_1"]["attn"]["value"]
    np.testing.assert_array_equal(value["lora_a"].reshape(-1, RANK), a.T)
    np.testing.assert_array_equal(value["lora_b"].reshape(RANK, -1), b.T)
    assert float(np.abs(b).max()) > 0.1
    conn = p["connector"]
    key = sd["speech_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"]  # [64, 80]; head h = rows 16h..
    np.testing.assert_array_equal(conn["window_qformer"]["speech_qformer"]["layers_1"]["crossattention"]["key"]
                                  ["kernel"][:, 2], key[32:48].T)
    query = sd["speech_Qformer.bert.encoder.layer.0.attention.self.query.weight"]
    np.testing.assert_array_equal(conn["window_qformer"]["speech_qformer"]["layers_0"]["attention"]["query"]
                                  ["kernel"].reshape(HIDDEN, HIDDEN), query.T)
    np.testing.assert_array_equal(conn["fusion"]["ln_speech"]["scale"], sd["ln_speech.weight"])
    np.testing.assert_array_equal(conn["fusion"]["ln_audio"]["bias"], sd["ln_audio.bias"])
    np.testing.assert_array_equal(conn["window_qformer"]["speech_query_tokens"], sd["speech_query_tokens"][0])
    np.testing.assert_array_equal(conn["window_qformer"]["speech_llama_proj"]["kernel"], sd["speech_llama_proj.weight"].T)
    np.testing.assert_array_equal(p["beats"]["patch_embedding"]["kernel"],
                                  sources["beats_sd"]["patch_embedding.weight"].transpose(2, 3, 1, 0))
    assert sorted(p["llm"]["layers_0"]["attn"]["key"]) == ["kernel"]  # LoRA only on q_proj / v_proj


def test_both_lora_spellings_give_the_same_variables(sources, converted, tmp_path):
    """An older peft saved `...q_proj.lora_A.weight` (no `.default`)."""
    def drop_default(sd):
        for k in [k for k in sd if ".lora_" in k]:
            sd[k.replace(".default.", ".")] = sd.pop(k)

    path = _variant(sources, tmp_path, drop_default)
    variables, config = _convert(sources, salmonn=path)
    chex.assert_trees_all_equal(variables, converted[0])
    assert config["kwargs"] == converted[1]["kwargs"]


# ---- bad input ------------------------------------------------------------------------------

def test_missing_unexpected_and_misshaped_keys_of_every_source_are_listed(sources, tmp_path):
    def edit(sd):
        del sd["speech_llama_proj.bias"]
        del sd[LORA.format(0, "q", "B")]
        sd["speech_Qformer.bert.pooler.dense.weight"] = np.zeros((HIDDEN, HIDDEN), np.float32)
        sd[LORA.format(0, "k", "A")] = np.zeros((RANK, LLM), np.float32)
        sd["ln_audio.weight"] = np.ones(AUDIO + 1, np.float32)

    beats = _torch_save(tmp_path / "beats.pt", {"cfg": json.loads(str(np.load(os.path.join(GOLDEN, "beats_tiny.npz"))[
        "cfg"])), "model": {k: v for k, v in sources["beats_sd"].items() if k != "encoder.layers.1.fc2.bias"}})
    with pytest.raises(ConversionError) as e:
        _convert(sources, salmonn=_variant(sources, tmp_path, edit), beats=beats)
    msg = str(e.value)
    assert msg.startswith("cannot convert SALMONN:")
    assert "params/connector/window_qformer/speech_llama_proj/bias (40,)" in msg  # missing
    assert "params/llm/layers_0/attn/query/lora_b" in msg  # missing adapter
    assert "speech_Qformer.bert.pooler.dense.weight (64, 64)" in msg  # unexpected
    assert LORA.format(0, "k", "A") + " -> params/llm/layers_0/attn/key/lora_a (no such variable" in msg
    assert "ln_audio.weight (65,) -> params/connector/fusion/ln_audio/scale expects (64,)" in msg  # mis-shaped
    assert "params/beats/layers_1/fc2/bias (64,)" in msg and "beats.pt" in msg  # BEATs: missing, same error
    assert "word_embeddings" not in msg and "cls" not in msg  # the dropped text parts are ignored


def test_lora_rank_and_presence(sources, converted, tmp_path):
    with pytest.raises(ConversionError, match=rf"lora rank=8 was given, but the adapters in .*salmonn_v1.pth have "
                                              rf"rank {RANK}"):
        _convert(sources, lora={"rank": 8})
    bare = _variant(sources, tmp_path, lambda sd: [sd.pop(k) for k in list(sd) if ".lora_" in k])
    with pytest.raises(ConversionError, match="holds no LoRA adapters.*pass lora=False"):
        _convert(sources, salmonn=bare)
    # lora=False: a SALMONN without adapters; the other variables are unchanged.
    variables, config = _convert(sources, salmonn=bare, lora=False, dtype="bfloat16")
    assert config["kwargs"]["lora"] is None
    want = {k: v for k, v in flatten(converted[0]).items() if "/lora_" not in k}
    assert set(flatten(variables)) == set(want)
    # bfloat16 storage: every parameter, rounded from the float32 conversion.
    assert config["dtype"] == "bfloat16"
    assert {str(a.dtype) for a in jax.tree.leaves(variables)} == {"bfloat16"}
    for k, v in flatten(variables).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(jnp.asarray(want[k], jnp.bfloat16)), err_msg=k)


def test_pickled_training_checkpoint_needs_allow_pickle(sources, converted, tmp_path):
    """The training code saves `{"model", "optimizer", "config", "scaler", "epoch"}`; its
    config object needs full unpickling."""
    def training(sd):
        return {"model": sd, "optimizer": {"state": {}}, "config": argparse.Namespace(lr=3e-5), "scaler": {},
                "epoch": 3}

    path = _variant(sources, tmp_path, lambda sd: None, "checkpoint_best.pth", training)
    with pytest.raises(ConversionError, match=r"checkpoint_best\.pth holds pickled Python objects.*--allow_pickle"):
        _convert(sources, salmonn=path)
    bare = _variant(sources, tmp_path, lambda sd: None, "bare.pth", lambda sd: sd)  # a bare state dict
    for source, allow in ((path, True), (bare, False)):
        variables, _ = _convert(sources, salmonn=source, allow_pickle=allow)
        chex.assert_trees_all_equal(variables, converted[0])


def test_configs_of_other_models_are_refused(sources, tmp_path):
    with pytest.raises(ConversionError) as e:  # both sources' problems in one error
        _convert(sources, vicuna=sources["paths"]["whisper"], beats=sources["paths"]["salmonn"])
    msg = str(e.value)
    assert "whisper: config.json has model_type='whisper'; SALMONN's LLM is one of ('llama',)" in msg
    assert "salmonn_v1.pth: no 'cfg' dict (the BEATsConfig fields)" in msg
    other = str(tmp_path / "bat")
    save_converted(other, {"params": {"x": np.zeros(2, np.float32)}}, {"model": "bat", "kwargs": {}})
    with pytest.raises(ConversionError, match=r"not a converted SALMONN model \(model='bat'\)"):
        load_salmonn(other)


def test_without_beats_the_audio_parts_are_unexpected(sources):
    """beats=None is SALMONN without BEATs: this checkpoint's ln_audio has no place."""
    with pytest.raises(ConversionError) as e:
        _convert(sources, beats=None)
    msg = str(e.value)
    assert "ln_audio.weight -> params/connector/fusion/ln_audio/scale (no such variable" in msg
    assert "crossattention.self.key.weight (64, 80) -> " in msg  # the Q-Former reads 16 features, not 80


# ---- the launcher ---------------------------------------------------------------------------

def test_launcher_round_trip_and_forward(sources, converted, tmp_path):
    from launch.convert import run_salmonn

    out = str(tmp_path / "converted")
    paths = sources["paths"]
    summary = run_salmonn(paths["whisper"], paths["beats"], paths["vicuna"], paths["salmonn"], out, **SIZES)
    assert summary["model"] == "salmonn" and summary["source_tensors"] == converted[1]["source_tensors"]
    module, variables = load_salmonn(out)
    chex.assert_trees_all_equal(variables, converted[0])
    assert load_pretrained(out)[0] == module  # the generic loader knows SALMONN too
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["sources"]["salmonn"] == os.path.abspath(paths["salmonn"])

    wave = 0.1 * np.random.default_rng(0).standard_normal((BATCH, SAMPLES)).astype(np.float32)
    lengths = np.array([SAMPLES, 20000], np.int32)  # the second clip fills one chunk
    prefix, suffix = np.ones((BATCH, 3), np.int32), np.full((BATCH, 4), 5, np.int32)
    per_chunk = module.tokens_per_chunk()
    assert per_chunk == 5  # 100 frames in 17-frame windows
    logits = _forward(module)(variables, wave, lengths, prefix, suffix)
    chex.assert_shape(logits, (BATCH, 3 + 2 * per_chunk + 4, VOCAB))
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_command_line_names_missing_flags(sources, tmp_path):
    from launch.convert import salmonn_sources

    with pytest.raises(app.UsageError, match="--model=salmonn needs --whisper, --vicuna"):
        salmonn_sources(None, "b.pt", None, "s.pth")
    assert salmonn_sources("w", "None", "v", "s") == ("w", None, "v", "s")
    paths = sources["paths"]
    cmd = [sys.executable, "-m", "launch.convert", "--model=salmonn", f"--source={paths['salmonn']}",
           f"--whisper={paths['whisper']}", f"--beats={paths['beats']}", f"--vicuna={paths['vicuna']}",
           f"--output={tmp_path / 'out'}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    # The command line sizes the connector as the original (12 heads), which 64 does not divide.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "hidden size 64 (from speech_query_tokens) is not a multiple of num_heads=12" in proc.stderr
    assert not (tmp_path / "out").exists()
