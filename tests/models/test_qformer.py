"""The Q-Former family: parity, conversion, shapes.

- `QFormer` against transformers' `Blip2QFormerModel` (tiny `Blip2QFormerConfig`: hidden
  64, 4 layers, 4 heads, FFN 128, cross-attention every 2nd layer, encoder width 48;
  weights redrawn at O(1) scale, `save_pretrained` as safetensors), converted with
  `convert_hf` and once end to end through `launch.convert.run_hf` + `load_pretrained`,
  with query embeddings and a padded encoder mask. fp32, max abs error <= 1e-4.
- `BatProjector` against the same torch Q-Former composed as SLAM-LLM's
  `EncoderProjectorQFormer` (query -> Q-Former -> Linear -> LayerNorm), converted from a
  state dict with BAT's `encoder_projector.*` names plus LoRA keys.
- SALMONN (`SalmonnConnector` = `AuditoryFusion` + `WindowQFormer`) against golden outputs
  of the ORIGINAL code, `tests/golden/salmonn_qformer_tiny.npz`, made as follows:
  bytedance/SALMONN branch `salmonn` (a58bba7) `models/Qformer.py` and `models/salmonn.py`
  (unedited, kept outside this repository), run by a generator with transformers 4.28.0
  (SALMONN's pinned version), torch 2.13.0+cpu, fp32. `salmonn.py`'s LLaMA/Whisper/BEATs/
  peft imports are stand-ins (unused by the code run); a SALMONN object is made without
  its `__init__` and given, as `__init__`/`init_speech_Qformer` do, `ln_speech`
  LayerNorm(48), `ln_audio` LayerNorm(32), a LAVIS `BertLMHeadModel` from a tiny
  `BertConfig` (hidden 64, 2 layers, 4 heads, FFN 128, vocab 100, 32 positions;
  encoder_width 80, add_cross_attention, cross_attention_freq 1, query_length 1) with
  word/position embeddings, each layer's `intermediate`/`output` and `cls` set to None,
  `speech_query_tokens` (1, 1, 64) and `speech_llama_proj` Linear(64, 40);
  `second_per_window = second_stride = 0.1` (window = stride = round(1500 * 0.1 / 30) = 5).
  Weights: every `state_dict()` tensor in sorted key order from one
  `np.random.default_rng(0)`: the query tokens N(0, 1), 1-D weights (LayerNorm scales)
  1 + 0.1 N, 1-D biases 0.1 N, matrices N(0, 1) / sqrt(fan_in); `position_ids` kept;
  loaded with `strict=True`, `eval()`. Inputs from `default_rng(1234)`: "whisper"
  2 N + 0.5 [2, 23, 48] and "beats" 3 N - 1 [2, 19, 32], through the original
  `SALMONN._encode_auditory_feature` (BEATs padded to 23 frames, 4 windows of 5 frames,
  3 frames dropped). The npz holds the state dict (`sd.<SALMONN key>`), the inputs, the
  fused features (the `F.unfold` input), the Q-Former's encoder input and output (forward
  hook), the output [2, 4, 40] and its mask.
- The window split against torch `F.unfold` as SALMONN calls it.
- Strict key accounting of the SALMONN and BAT maps (text parts, buffers and LoRA keys
  ignored with reasons), conversion errors, chex shapes with masks (jit and eager),
  logical axes, dropout, and the parameter counts at the real sizes.
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

from jaxaudio.convert import ConversionError, convert
from jaxaudio.convert.hf import convert_hf, load_pretrained
from jaxaudio.convert.qformer import bat_key_map, salmonn_key_map
from jaxaudio.layers import DEFAULT_RULES
from jaxaudio.models.qformer import (AuditoryFusion, BatProjector, QFormer, SalmonnConnector, WindowQFormer,
                                     num_windows, split_windows, window_frames)

TOL = 1e-4
HIDDEN, LAYERS, HEADS, FFN, ENC = 64, 4, 4, 128, 48
BATCH, QUERIES, FRAMES, LLM = 3, 5, 7, 40
TINY = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
            cross_attention_frequency=2, encoder_hidden_size=ENC)
QF = dict(hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, intermediate_size=FFN, encoder_hidden_size=ENC)
AXIS_NAMES = {"embed", "mlp", "heads", "kv", "tokens", "norm"}
GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden", "salmonn_qformer_tiny.npz")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "LayerNorm.weight" in name or "layernorm.weight" in name else 0.2 * noise)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(save_pretrained directory, the torch `Blip2QFormerModel` in eval mode)."""
    model = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**TINY)).eval()
    _randomize(model, 0)
    path = str(tmp_path_factory.mktemp("blip2_qformer"))
    model.save_pretrained(path)
    return path, model


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Query embeddings and encoder states; the encoder rows hold 7, 4 and 1 real frames."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(FRAMES)[None] < np.array([FRAMES, 4, 1])[:, None]).astype(np.int64)
    return {"query_embeds": rng.standard_normal((BATCH, QUERIES, HIDDEN)).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((BATCH, FRAMES, ENC)).astype(np.float32),
            "encoder_attention_mask": mask}


def _torch(model, **inputs):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})


@functools.lru_cache(maxsize=None)
def _jit(module: nn.Module):
    """One jitted forward per module configuration, shared by every test."""
    return jax.jit(module.apply)


def _assert_close(got, want, what: str) -> float:
    want = want.numpy() if hasattr(want, "numpy") else want
    err = float(np.max(np.abs(np.asarray(got) - want)))
    assert err <= TOL, f"{what}: max abs error {err:.3g} > tolerance {TOL}"
    print(f"{what}: max abs error {err:.3g} (tolerance {TOL})")
    return err


@functools.lru_cache(maxsize=None)
def _converted(path: str):
    variables, config = convert_hf(path)
    return QFormer(**config["kwargs"]), variables, config


def _qformer_matches(module, variables, hf_model, seed: int, what: str) -> None:
    x = _inputs(seed)
    want = _torch(hf_model, **x).last_hidden_state
    got = _jit(module)(variables, x["query_embeds"], x["encoder_hidden_states"], x["encoder_attention_mask"])
    _assert_close(got, want, what)
    assert float(np.std(np.asarray(got))) > 0.5  # not a degenerate forward


# ---- BLIP-2 Q-Former vs transformers --------------------------------------------------------

def test_qformer_matches_transformers(checkpoint):
    path, hf_model = checkpoint
    module, variables, config = _converted(path)
    assert config["model"] == "qformer" and config["source_model_type"] == "blip_2_qformer"
    assert config["kwargs"] == dict(QF, cross_attention_frequency=2, hidden_act="gelu", eps=1e-12, dropout=0.1,
                                    attention_dropout=0.1)
    assert sorted(variables["params"]["layers_1"]) == ["attention", "attention_norm", "intermediate_query",
                                                      "output_query", "output_query_norm"]
    assert "crossattention" in variables["params"]["layers_2"]
    _qformer_matches(module, variables, hf_model, 0, "Q-Former last_hidden_state (masked encoder)")
    x = _inputs(0)
    unmasked = _jit(module)(variables, x["query_embeds"], x["encoder_hidden_states"])
    want = _torch(hf_model, query_embeds=x["query_embeds"], encoder_hidden_states=x["encoder_hidden_states"])
    _assert_close(unmasked, want.last_hidden_state, "Q-Former last_hidden_state (no mask)")
    # The mask matters: the third row sees one frame of seven.
    masked = _jit(module)(variables, x["query_embeds"], x["encoder_hidden_states"], x["encoder_attention_mask"])
    assert float(np.max(np.abs(np.asarray(masked)[2] - np.asarray(unmasked)[2]))) > 0.1


def test_launcher_end_to_end(checkpoint, tmp_path):
    from launch.convert import run_hf

    path, hf_model = checkpoint
    summary = run_hf(path, str(tmp_path / "out"))
    assert summary["model"] == "qformer"
    module, variables = load_pretrained(str(tmp_path / "out"))
    assert module == _converted(path)[0]
    _qformer_matches(module, variables, hf_model, 3, "launcher-converted Q-Former")


# ---- BAT's projector ------------------------------------------------------------------------

class _TorchBatProjector(torch.nn.Module):
    """SLAM-LLM's `EncoderProjectorQFormer` forward, around the tiny torch Q-Former."""

    def __init__(self, qformer, queries: int, llm: int):
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(1, queries, HIDDEN, generator=torch.Generator().manual_seed(1)))
        self.qformer = qformer
        self.linear = torch.nn.Linear(HIDDEN, llm)
        self.norm = torch.nn.LayerNorm(llm, eps=1e-5)
        with torch.no_grad():
            self.norm.weight.add_(0.1 * torch.randn(llm, generator=torch.Generator().manual_seed(2)))
            self.norm.bias.add_(0.1 * torch.randn(llm, generator=torch.Generator().manual_seed(3)))

    def forward(self, x, atts=None):
        query = self.query.expand(x.shape[0], -1, -1)
        out = self.qformer(query_embeds=query, encoder_hidden_states=x, encoder_attention_mask=atts)
        return self.norm(self.linear(out.last_hidden_state))


def _lora_keys(prefix: str, layers: int = 2, width: int = 32, rank: int = 8) -> dict[str, np.ndarray]:
    """PEFT's LoRA keys on q_proj/v_proj, layer 0 with `.default` (recent peft), layer 1 without."""
    out = {}
    for i in range(layers):
        default = ".default" if i == 0 else ""
        for proj in ("q_proj", "v_proj"):
            base = f"{prefix}.base_model.model.model.layers.{i}.self_attn.{proj}"
            out[f"{base}.lora_A{default}.weight"] = np.zeros((rank, width), np.float32)
            out[f"{base}.lora_B{default}.weight"] = np.zeros((width, rank), np.float32)
    return out


@pytest.fixture(scope="module")
def bat(checkpoint):
    projector = _TorchBatProjector(checkpoint[1], queries=6, llm=LLM).eval()
    sd = {f"encoder_projector.{k}": v.numpy() for k, v in projector.state_dict().items()}
    sd.update(_lora_keys("llm"))
    module = BatProjector(llm_width=LLM, num_queries=6, num_layers=LAYERS, hidden_size=HIDDEN, num_heads=HEADS,
                          intermediate_size=FFN, encoder_hidden_size=ENC)
    expected = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, FRAMES, ENC))))
    return projector, sd, module, expected


def test_bat_projector_matches_torch(bat):
    projector, sd, module, expected = bat
    variables = convert(sd, bat_key_map(), expected, source_name="BAT model.pt")
    np.testing.assert_array_equal(variables["params"]["query"], sd["encoder_projector.query"][0])
    x = _inputs(1)
    for mask in (x["encoder_attention_mask"], None):
        want = _torch(projector, x=x["encoder_hidden_states"], **({} if mask is None else {"atts": mask}))
        got = _jit(module)(variables, x["encoder_hidden_states"], mask)
        chex.assert_shape(got, (BATCH, 6, LLM))
        _assert_close(got, want, f"BAT projector ({'masked' if mask is not None else 'no mask'})")


def test_bat_key_map_accounting(bat):
    _, sd, _, expected = bat
    text_ffn = {f"encoder_projector.qformer.encoder.layer.0.{m}.dense.weight": np.zeros((1, 1), np.float32)
                for m in ("intermediate", "output")}
    convert({**sd, **text_ffn}, bat_key_map(), expected)  # ignored: the text feed-forward
    with pytest.raises(ConversionError, match="unexpected keys") as e:  # the adapters, when the caller maps them
        convert(sd, bat_key_map(ignore_llm_adapters=False), expected)
    assert "llm.base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in str(e.value)
    broken = {k: v for k, v in sd.items() if k != "encoder_projector.norm.bias"}
    broken["encoder_projector.query"] = sd["encoder_projector.query"][:, :5]
    broken["encoder_projector.qformer.encoder.layer.1.crossattention.attention.key.weight"] = np.zeros((64, 48))
    with pytest.raises(ConversionError) as e:
        convert(broken, bat_key_map(), expected)
    msg = str(e.value)
    assert "1 unexpected keys" in msg and "layer.1.crossattention.attention.key.weight" in msg
    assert "params/norm/bias (40,)" in msg
    assert "encoder_projector.query (1, 5, 64) -> params/query expects (6, 64)" in msg


# ---- SALMONN against the original code ------------------------------------------------------

@pytest.fixture(scope="module")
def golden():
    g = dict(np.load(GOLDEN))
    sd = {k[3:]: v for k, v in g.items() if k.startswith("sd.")}
    module = SalmonnConnector(speech_width=48, audio_width=32, llm_width=LLM, second_per_window=0.1,
                              second_stride=0.1, hidden_size=HIDDEN, num_layers=2, num_heads=HEADS,
                              intermediate_size=FFN)
    expected = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 23, 48)),
                                       jnp.zeros((1, 19, 32))))
    variables = convert(sd, salmonn_key_map(), expected, source_name="golden SALMONN state dict")
    return g, sd, module, expected, variables


def test_salmonn_matches_original(golden):
    g, _, module, _, variables = golden
    wq = variables["params"]["window_qformer"]
    fused = _jit(AuditoryFusion(48, 32))({"params": variables["params"]["fusion"]}, g["whisper"], g["beats"])
    _assert_close(fused, g["fused"], "SALMONN fused features")
    window = WindowQFormer(LLM, 1, 0.1, 0.1, hidden_size=HIDDEN, num_heads=HEADS, intermediate_size=FFN,
                           encoder_hidden_size=80)
    assert (window.window, window.stride) == (5, 5)
    np.testing.assert_array_equal(np.asarray(split_windows(g["fused"], 5, 5)).reshape(8, 5, 80), g["windows"])
    out = _jit(module)(variables, g["whisper"], g["beats"])
    chex.assert_shape(out, (2, 4, LLM))
    _assert_close(out, g["output"], "SALMONN window Q-Former output vs original")
    qformer_out = _jit(QFormer(HIDDEN, 2, HEADS, FFN, 80, 1))(
        {"params": wq["speech_qformer"]}, np.broadcast_to(wq["speech_query_tokens"], (8, 1, HIDDEN)), g["windows"])
    _assert_close(qformer_out, g["qformer_out"], "SALMONN Q-Former last_hidden_state vs original")
    assert float(np.std(g["output"])) > 0.5 and g["output_mask"].shape == (2, 4) and g["output_mask"].all()


def _salmonn_text_parts(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a checkpoint of the 2023 code may still hold: the LAVIS Q-Former's text parts
    (tiny sizes: vocab 100, 32 positions, hidden 64, FFN 128), LoRA and rotary buffers."""
    z = functools.partial(np.zeros, dtype=np.float32)
    bert = "speech_Qformer.bert."
    extra = {bert + "embeddings.word_embeddings.weight": z((100, HIDDEN)),
             bert + "embeddings.position_embeddings.weight": z((32, HIDDEN)),
             "speech_Qformer.cls.predictions.bias": z(100),
             "speech_Qformer.cls.predictions.transform.dense.weight": z((HIDDEN, HIDDEN)),
             "speech_Qformer.cls.predictions.transform.dense.bias": z(HIDDEN),
             "speech_Qformer.cls.predictions.transform.LayerNorm.weight": z(HIDDEN),
             "speech_Qformer.cls.predictions.transform.LayerNorm.bias": z(HIDDEN),
             "speech_Qformer.cls.predictions.decoder.weight": z((100, HIDDEN)),
             "speech_Qformer.cls.predictions.decoder.bias": z(100),
             "llama_model.base_model.model.model.layers.0.self_attn.rotary_emb.inv_freq": z(16)}
    for i in range(2):
        layer = f"{bert}encoder.layer.{i}."
        extra.update({layer + "intermediate.dense.weight": z((FFN, HIDDEN)), layer + "intermediate.dense.bias": z(FFN),
                      layer + "output.dense.weight": z((HIDDEN, FFN)), layer + "output.dense.bias": z(HIDDEN),
                      layer + "output.LayerNorm.weight": z(HIDDEN), layer + "output.LayerNorm.bias": z(HIDDEN)})
    extra.update(_lora_keys("llama_model"))
    assert not set(extra) & set(sd)
    return {**sd, **extra}


def test_salmonn_key_map_accounting(golden):
    _, sd, _, expected, variables = golden
    assert "speech_Qformer.bert.embeddings.position_ids" in sd  # a buffer of the original module
    assert len(sd) == 62
    full = _salmonn_text_parts(sd)
    again = convert(full, salmonn_key_map(), expected)
    chex.assert_trees_all_equal(again, variables)
    p = variables["params"]
    np.testing.assert_array_equal(p["fusion"]["ln_audio"]["scale"], sd["ln_audio.weight"])
    np.testing.assert_array_equal(p["window_qformer"]["speech_llama_proj"]["kernel"], sd["speech_llama_proj.weight"].T)
    key = sd["speech_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"]  # [64, 80]: head h = rows 16h..
    np.testing.assert_array_equal(p["window_qformer"]["speech_qformer"]["layers_1"]["crossattention"]["key"]["kernel"]
                                  [:, 2], key[32:48].T)

    with pytest.raises(ConversionError, match="unexpected keys") as e:
        convert(full, salmonn_key_map(ignore_llm_adapters=False), expected)
    assert "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in str(e.value)
    broken = {k: v for k, v in full.items() if not k.startswith("ln_speech")}
    broken["speech_Qformer.bert.encoder.layer.2.attention.self.query.weight"] = np.zeros((HIDDEN, HIDDEN))
    broken["speech_query_tokens"] = np.zeros((1, 2, HIDDEN), np.float32)
    with pytest.raises(ConversionError) as e:
        convert(broken, salmonn_key_map(), expected)
    msg = str(e.value)
    assert "speech_Qformer.bert.encoder.layer.2.attention.self.query.weight -> " \
           "params/window_qformer/speech_qformer/layers_2/attention/query/kernel (no such variable" in msg
    assert "params/fusion/ln_speech/scale (48,)" in msg and "params/fusion/ln_speech/bias (48,)" in msg
    assert "speech_query_tokens (1, 2, 64) -> params/window_qformer/speech_query_tokens expects (1, 64)" in msg


# ---- windows --------------------------------------------------------------------------------

def _torch_unfold_windows(x: np.ndarray, window: int, stride: int) -> np.ndarray:
    """SALMONN's window split, line for line: `[B, T, C]` -> `[B * windows, window, C]`."""
    t = torch.from_numpy(x)
    b, _, c = t.shape
    unfolded = torch.nn.functional.unfold(t.transpose(1, 2).unsqueeze(2), kernel_size=(1, window), dilation=1,
                                          padding=0, stride=(1, stride))
    unfolded = unfolded.view(b, -1, window, unfolded.shape[-1])
    return torch.permute(unfolded, [0, 3, 2, 1]).reshape(-1, window, c).numpy()


@pytest.mark.parametrize("frames, window, stride", [(23, 5, 5), (20, 5, 5), (23, 4, 3), (17, 17, 17), (30, 6, 8)])
def test_window_split_matches_torch_unfold(frames, window, stride):
    x = np.random.default_rng(frames).standard_normal((2, frames, 6)).astype(np.float32)
    got = np.asarray(split_windows(x, window, stride))
    n = num_windows(frames, window, stride)
    chex.assert_shape(got, (2, n, window, 6))
    np.testing.assert_array_equal(got.reshape(-1, window, 6), _torch_unfold_windows(x, window, stride))


def test_window_sizes_from_seconds():
    assert window_frames(0.333333) == 17 and num_windows(1500, 17, 17) == 88  # frames 1496..1499 dropped
    assert window_frames(0.1) == 5 and window_frames(1.0, frames_per_30s=3000) == 100
    m = WindowQFormer()
    assert (m.window, m.stride) == (17, 17)
    with pytest.raises(ValueError, match="3 frames are fewer than one window of 5"):
        num_windows(3, 5, 5)


# ---- conversion errors ----------------------------------------------------------------------

def _variant(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


def test_config_with_another_hidden_size_lists_the_misshaped_keys(checkpoint, tmp_path):
    src = _variant(checkpoint[0], tmp_path / "c", lambda c: c.update(hidden_size=32))
    with pytest.raises(ConversionError, match="82 mis-shaped tensors") as e:  # all but the 4 intermediate_query biases
        convert_hf(src)
    for key in ("encoder.layer.0.attention.attention.query.weight (64, 64)",
                "encoder.layer.0.crossattention.attention.key.bias (64,)",
                "encoder.layer.1.output_query.dense.weight (64, 128)"):
        assert key in str(e.value), str(e.value)


def test_config_with_more_layers_or_other_cross_frequency(checkpoint, tmp_path):
    src = _variant(checkpoint[0], tmp_path / "layers", lambda c: c.update(num_hidden_layers=5))
    with pytest.raises(ConversionError, match="missing variables") as e:
        convert_hf(src)
    assert "params/layers_4/crossattention/key/kernel (48, 4, 16)" in str(e.value)
    src = _variant(checkpoint[0], tmp_path / "freq", lambda c: c.update(cross_attention_frequency=1))
    with pytest.raises(ConversionError, match="missing variables") as e:
        convert_hf(src)
    assert "params/layers_1/crossattention/query/kernel" in str(e.value)
    assert "params/layers_3/crossattention_norm/scale" in str(e.value)
    src = _variant(checkpoint[0], tmp_path / "enc", lambda c: c.update(encoder_hidden_size=40))
    with pytest.raises(ConversionError, match="mis-shaped") as e:
        convert_hf(src)
    assert "encoder.layer.2.crossattention.attention.value.weight (64, 48)" in str(e.value)


@pytest.mark.parametrize("field", ["encoder_hidden_size", "cross_attention_frequency", "num_hidden_layers"])
def test_missing_config_field_is_named(checkpoint, tmp_path, field):
    src = _variant(checkpoint[0], tmp_path / "c", lambda c: c.pop(field))
    with pytest.raises(ConversionError, match=f"field '{field}' is missing"):
        convert_hf(src)


# ---- shapes, axes, dropout ------------------------------------------------------------------

def _tiny_modules():
    return {
        "qformer": QFormer(**QF),
        "bat": BatProjector(llm_width=LLM, num_queries=6, hidden_size=HIDDEN, num_layers=2, num_heads=HEADS,
                            intermediate_size=FFN, encoder_hidden_size=ENC),
        "window": WindowQFormer(llm_width=LLM, num_queries=2, second_per_window=0.1, second_stride=0.08,
                                hidden_size=HIDDEN, num_heads=HEADS, intermediate_size=FFN, encoder_hidden_size=ENC),
        "fusion": AuditoryFusion(speech_width=ENC, audio_width=16),
    }


@functools.lru_cache(maxsize=None)
def _init(name: str):
    module = _tiny_modules()[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 13, ENC)), jnp.float32)
    args = {"qformer": (jnp.zeros((2, QUERIES, HIDDEN)), x), "bat": (x,), "window": (x,),
            "fusion": (x, jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.float32))}[name]
    return module, jax.jit(module.init)(jax.random.PRNGKey(0), *args)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_shapes(use_jit):
    def run(module, variables, *args):
        return _jit(module)(variables, *args) if use_jit else module.apply(variables, *args)

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((BATCH, 23, ENC)), jnp.float32)
    mask = jnp.asarray(np.arange(23)[None] < np.array([23, 11, 3])[:, None])
    module, v = _init("qformer")
    q = jnp.asarray(rng.standard_normal((BATCH, QUERIES, HIDDEN)), jnp.float32)
    out = run(module, nn.unbox(v), q, x, mask)
    chex.assert_shape(out, (BATCH, QUERIES, HIDDEN))
    chex.assert_tree_all_finite(out)

    module, v = _init("bat")
    out = run(module, nn.unbox(v), x, mask)
    chex.assert_shape(out, (BATCH, 6, LLM))
    chex.assert_tree_all_finite(out)

    module, v = _init("window")  # window 5, stride 4: 23 frames -> 5 windows, 2 queries each
    out = run(module, nn.unbox(v), x, mask)
    chex.assert_shape(out, (BATCH, 10, LLM))
    chex.assert_tree_all_finite(out)
    np.testing.assert_array_equal(module.window_mask(mask)[2], [True] * 2 + [False] * 8)  # 3 real frames
    if use_jit:  # eager dispatch compiles op by op: the comparisons run once
        unmasked = run(module, nn.unbox(v), x)
        assert np.allclose(np.asarray(out)[0], np.asarray(unmasked)[0], atol=1e-5)  # a full row
        assert not np.allclose(np.asarray(out)[1, :6], np.asarray(unmasked)[1, :6])  # window 3: frames 12..16

    module, v = _init("fusion")
    for ts, ta in ((13, 9), (7, 12)) if use_jit else ((13, 9),):
        s = jnp.asarray(rng.standard_normal((BATCH, ts, ENC)), jnp.float32)
        a = jnp.asarray(rng.standard_normal((BATCH, ta, 16)), jnp.float32)
        out = run(module, nn.unbox(v), s, a)
        chex.assert_shape(out, (BATCH, max(ts, ta), ENC + 16))
        short, width = (slice(ENC, None), ta) if ta < ts else (slice(0, ENC), ts)
        np.testing.assert_array_equal(np.asarray(out)[:, width:, short], 0.0)  # zero-padded after the norm
        chex.assert_trees_all_close(np.asarray(out)[:, :ts, :ENC].std(-1), np.ones((BATCH, ts)), atol=0.35)


def test_salmonn_connector_shapes_and_speech_only():
    module = SalmonnConnector(speech_width=ENC, audio_width=None, llm_width=LLM, second_per_window=0.1,
                              second_stride=0.1, hidden_size=HIDDEN, num_layers=1, num_heads=HEADS,
                              intermediate_size=FFN)
    x = jnp.ones((2, 12, ENC))
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    assert "ln_audio" not in variables["params"]["fusion"]
    chex.assert_shape(jax.eval_shape(module.apply, variables, x), (2, 2, LLM))
    with pytest.raises(ValueError, match="audio_width=None but audio features were given"):
        module.apply(variables, x, jnp.ones((2, 12, 8)))
    with pytest.raises(ValueError, match="encoder_hidden_states has width 8, encoder_hidden_size is 48"):
        QFormer(**QF).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, HIDDEN)), jnp.zeros((1, 3, 8)))


def test_every_parameter_has_logical_axes():
    for name in _tiny_modules():
        boxed = _init(name)[1]["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves), name
        names = {n for x in leaves for n in x.names}
        assert names <= AXIS_NAMES, (name, names - AXIS_NAMES)
        nn.logical_to_mesh(nn.get_partition_spec(boxed), DEFAULT_RULES)  # no axis named twice in a kernel


def test_dropout_needs_an_rng_and_changes_the_output():
    module, v = _init("bat")
    v = nn.unbox(v)
    x = jnp.ones((1, 4, ENC))
    ref = _jit(module)(v, x)
    train = jax.jit(lambda v, x, key: module.apply(v, x, deterministic=False, rngs={"dropout": key}))
    a, b = train(v, x, jax.random.PRNGKey(1)), train(v, x, jax.random.PRNGKey(2))
    assert not np.allclose(a, ref) and not np.allclose(a, b)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        module.apply(v, x, deterministic=False)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_parameter_counts_at_real_sizes():
    """BAT: Q-Former + queries 66.21M, projection 3.16M (reference §4); SALMONN: Q-Former +
    query 22.84M, projection 3.15M (7B) / 3.94M (13B), fusion LayerNorms 4096."""
    p = nn.unbox(jax.eval_shape(BatProjector().init, jax.random.PRNGKey(0), jnp.zeros((1, 515, 768))))["params"]
    assert _count(p["qformer"]) + _count(p["query"]) == 66_209_280
    assert _count(p["linear"]) + _count(p["norm"]) == 3_158_016
    for llm, proj in ((4096, 3_149_824), (5120, 3_937_280)):
        module = SalmonnConnector(llm_width=llm)
        v = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 1500, 1280)), jnp.zeros((1, 1496, 768)))
        p = nn.unbox(v)["params"]
        w = p["window_qformer"]
        assert _count(w["speech_qformer"]) + _count(w["speech_query_tokens"]) == 22_838_016
        assert _count(w["speech_llama_proj"]) == proj and _count(p["fusion"]) == 4096
        out = jax.eval_shape(module.apply, v, jnp.zeros((2, 1500, 1280)), jnp.zeros((2, 1496, 768)))
        assert out.shape == (2, 88, llm)
