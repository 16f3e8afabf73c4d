"""SALMONN (Whisper + BEATs -> window Q-Former -> LoRA LLaMA) against golden outputs of the
ORIGINAL code, and the model's own behaviour (chunks, padding, gradients, decoding, LoRA scale).

How `tests/golden/salmonn_tiny.npz` was made
--------------------------------------------
* Original code: bytedance/SALMONN branch `salmonn` (a58bba7) `models/salmonn.py` with its
  `Qformer.py`, `modeling_llama.py`, `modeling_whisper.py`, `utils.py` and `beats/`, unedited,
  outside this repository (`/work/golden_src/salmonn/original/`, generator
  `/work/golden_src/salmonn/make_golden_full.py`), run with transformers 4.28.0 and peft 0.3.0
  (SALMONN's pinned versions), torch 2.13.0+cpu, fp32. torchaudio cannot be imported with
  this torch, so `torchaudio.compliance.kaldi.fbank` is a stand-in computed by
  kaldi-native-fbank (as for tests/models/test_beats.py).
* SALMONN is built by its own `__init__` (lora r 8 / alpha 32 / dropout 0.1, window 1/3 s,
  prompt template `USER: {}\\nASSISTANT:`, a prompt file with one prompt per task) from tiny
  checkpoints written by the generator, all weights redrawn at O(1) scale from seeded numpy
  generators (norm scales 1 + 0.1 N, biases 0.1 N, matrices N / sqrt(fan_in), LoRA B not zero):
  - Whisper: transformers `WhisperModel` (d_model 32, 2 encoder layers, 4 heads, FFN 64,
    80 mels, max_source_positions 1500: the original always pads to 30 s; a 1-layer decoder);
  - BEATs: `{"cfg", "model"}` of the original `BEATs` (16 -> 32 wide, 2 DeepNorm layers,
    4 heads, FFN 64, conv_pos 16 / 4 groups, gated relative positions, fine-tuned head of 5);
  - LLaMA: `LlamaForCausalLM` (vocab 320, hidden 32, 2 layers, 4 heads, FFN 64, rms eps
    1e-6) with a slow `LlamaTokenizer` of a 320-piece sentencepiece BPE model trained on a
    few lines of English; the EOS row of lm_head is scaled by 5 so that decoding ends
    inside 8 tokens; the weights are fp16-representable, because SALMONN loads the LLM in
    fp16 (the generator then casts the whole model to fp32 and sets eval mode);
  - monkeypatched in the generator only: `BertConfig.from_pretrained("bert-base-uncased")`
    (the hub is unreachable) returns a tiny BertConfig (hidden 32, 2 heads, FFN 64), so the
    window Q-Former is 2 layers of that size; `torch.Tensor.cuda` is the identity during
    `generate` (its stop word is `.cuda()`d).
  SALMONN's own parameters (Q-Former, query, projection, ln_speech / ln_audio, LoRA, the
  `[PAD]` rows that `resize_token_embeddings` appended) are redrawn after `__init__`.
* Inputs, as `SALMONNDataset` makes them: 16-bit clips of 2.0 s and 1.2 s (a tone + seeded
  noise), `WhisperFeatureExtractor` log-mels, raw waveforms with `collater`'s padding mask.
  Each clip runs alone (a batch of 1) through `forward` (clip 0 task asr, clip 1 task
  audiocaption, prompts of equal token length) and `generate` (beam 4 and greedy, 8 new
  tokens; clip 1 with a 2 tokens shorter prompt).
* Stored: every tensor of the four sources under its original key (`whisper/`, `beats/`,
  `llama/` with the tokenizer's 320 rows, `salmonn/` = what SALMONN's runner saves: the
  trainable parameters, LoRA as `...lora_A.default.weight`, and the buffers), the configs as
  json, the token ids SALMONN embedded (p_before, p_after, target + `</s>`), its audio
  embeddings (`encode_speech`), the loss and labels of `forward`, the LLM's logits from the
  last audio position on and their logsumexp over the 320-token vocabulary at every
  position, the generated ids, the loss of both clips in one batch, and (unused here) the
  `[PAD]` rows and the tokenizer model.

What differs from the original, on purpose
------------------------------------------
* `[PAD]`: the original appends a never-trained row to the LLM's embeddings and lm_head;
  the converter keeps the Vicuna vocabulary (`jaxaudio.convert.salmonn`), so our logits are
  the original's without that column. The loss is checked both ways: ours against the
  original's logits without the column, and ours with the original's `[PAD]` column put
  back against the original's `forward` loss.
* BEATs padding: the original runs BEATs on a batch zero-padded to its longest clip and
  reduces the padding mask coarsely, so a shorter clip's audio embeddings depend on its
  batch; ours mask each clip's padding exactly, which is the original's result for the
  clip alone. The golden is per clip; in the original's batch of both clips, the longer
  clip's audio embeddings are unchanged, the shorter one's move, and the batch loss is not
  the per-clip one (checked).
* Decoding: transformers 4.28 generates from `inputs_embeds` with a BOS placeholder in
  `input_ids`, so its outputs start with 1 and a hypothesis cut at `max_new_tokens` is
  ranked by `score / (tokens + 1)`, whereas one ending with EOS gets `score / tokens`
  (EOS counted). `jaxaudio.generate` ranks both by `score / tokens` (transformers 5). This
  decides clip 0's beam search, checked here by scoring both hypotheses.
* The runner's checkpoint also holds BEATs' `encoder.layers.1.self_attn.
  relative_attention_bias.weight` (one module shared by all layers: torch's
  `named_parameters` lists it once, so the frozen-parameter filter keeps the other
  layers' names); the converter ignores it (`RUNNER_EXTRA`), with its reason.

fp32, max abs error <= 1e-4 (measured: audio embeddings 1.9e-6, logits 1.3e-5, logsumexp
2.1e-5, losses 4.8e-7); the model's own properties are checked to 1e-5.
"""
import functools
import json
import os
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from configs.salmonn import base_config
from jaxaudio.convert import flatten, unflatten
from jaxaudio.convert.salmonn import build, convert_salmonn
from jaxaudio.layers import DEFAULT_RULES
from jaxaudio.models.audio_llm import IGNORE, build_sequence, left_pad, text_loss
from jaxaudio.models.beats import beats_tokens, clip_token_padding
from jaxaudio.models.salmonn import Salmonn, answer
from jaxaudio.train.optim import trainable_mask

TOL = 1e-4
GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden", "salmonn_tiny.npz")
BOS, EOS, PAD = 1, 2, 0  # PAD: `<unk>`, as configs/salmonn.py (a real row; its positions are masked)
SR = 16000
NEW_TOKENS = 8
RUNNER_EXTRA = re.compile(r"beats\.encoder\.layers\.\d+\.self_attn\.relative_attention_bias\.weight")
# The original's beam search keeps a hypothesis cut at NEW_TOKENS over clip 0's EOS-ended one.
CUT_HYPOTHESIS = {(0, 4)}


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    top = x.max(-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[..., 0]


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Hugging Face's causal LM loss in float64: logits at t predict labels[t + 1]."""
    keep = labels[1:] != IGNORE
    rows = np.asarray(logits[:-1], np.float64)[keep]
    return float(np.mean(_logsumexp(rows) - rows[np.arange(len(rows)), labels[1:][keep]]))


_text_loss = jax.jit(text_loss)


def _assert_close(got, want, what: str, tol: float = TOL) -> float:
    err = _max_err(got, want)
    print(f"{what}: max abs error {err:.3g} (tolerance {tol})")
    assert err <= tol, f"{what}: max abs error {err:.3g} > tolerance {tol}"
    return err


# ---- the golden file and the four sources ---------------------------------------------------

@pytest.fixture(scope="module")
def golden():
    g = dict(np.load(GOLDEN))
    text = {k: g.pop(k).item().decode() for k in ("whisper_config", "llama_config", "beats_cfg", "bert_config",
                                                  "versions", "generate_config")}
    parts = {name: {k[len(name) + 1:]: v for k, v in g.items() if k.startswith(name + "/")}
             for name in ("whisper", "beats", "llama", "salmonn")}
    clips = [{k[6:]: v for k, v in g.items() if k.startswith(f"clip{i}/")} for i in range(2)]
    for c in clips:
        c["wave"] = c["wave"].astype(np.float32) / 32768.0  # 16-bit PCM, as soundfile reads it
    return dict(g=g, parts=parts, clips=clips, **{k: json.loads(v) if k.endswith(("config", "cfg")) else v
                                                   for k, v in text.items()})


def _hf_dir(path: str, tensors: dict, config: dict) -> str:
    os.makedirs(path)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)  # the transformers 4.28 config, as SALMONN's checkpoints have
    return path


@pytest.fixture(scope="module")
def sources(golden, tmp_path_factory):
    root = tmp_path_factory.mktemp("salmonn")
    parts = golden["parts"]
    paths = dict(whisper=_hf_dir(str(root / "whisper"), parts["whisper"], golden["whisper_config"]),
                 beats=str(root / "beats.pt"),
                 vicuna=_hf_dir(str(root / "vicuna"), parts["llama"], golden["llama_config"]),
                 salmonn=str(root / "salmonn_v1.pth"))
    torch.save({"cfg": golden["beats_cfg"], "model": {k: torch.from_numpy(v) for k, v in parts["beats"].items()}},
               paths["beats"])
    checkpoint = {k: torch.from_numpy(v) for k, v in parts["salmonn"].items()}
    assert sum(bool(RUNNER_EXTRA.fullmatch(k)) for k in checkpoint) == 1  # ignored by the converter
    torch.save({"model": checkpoint}, paths["salmonn"])
    return paths


@pytest.fixture(scope="module")
def converted(golden, sources):
    heads = golden["bert_config"]["num_attention_heads"]  # the one Q-Former size no tensor shows
    variables, config = convert_salmonn(sources["whisper"], sources["beats"], sources["vicuna"], sources["salmonn"],
                                        connector={"num_heads": heads})
    module = build(config["kwargs"])[0]
    return module, variables, config


# ---- shared compiled functions --------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _forward(module: Salmonn):
    """`(audio embeddings, audio mask, LLM input embeddings, input mask, logits)`; `scale`
    (LoRA, one per example) is traced, so every scale shares the compile."""
    def run(m, wave, lengths, prefix, suffix, suffix_mask, scale):
        x, mask = m.input_embeddings(wave, lengths, prefix, suffix, suffix_mask)
        audio = slice(prefix.shape[1], x.shape[1] - suffix.shape[1])  # encode_audio's output sits there
        return (x[:, audio], mask[:, audio].astype(bool), x, mask,
                m(wave, lengths, prefix, suffix, suffix_mask, lora_scale=scale))

    return jax.jit(lambda v, *args: module.apply(v, *args, method=run))


def _scale(*values):
    return np.array(values or (4.0, 4.0), np.float32)  # alpha / rank by default


def _batch(clips, prompt_key: str = "p_after", with_target: bool = True, width: int = 0):
    """Both clips, zero-padded to the longer (lengths say where they end), `[BOS] + p_before`,
    and the text after the audio (prompt + target) right-padded to at least `width`, or
    (`with_target=False`) the prompt left-padded."""
    n = max(len(c["wave"]) for c in clips)
    wave = np.stack([np.pad(c["wave"], (0, n - len(c["wave"]))) for c in clips])
    lengths = np.array([len(c["wave"]) for c in clips], np.int32)
    prefix = np.array([[BOS, *c["p_before"]] for c in clips], np.int32)
    if not with_target:
        prompt, mask = left_pad([list(c[prompt_key]) for c in clips], PAD)
        return wave, lengths, prefix, prompt, mask
    texts = [list(c[prompt_key]) + list(c["target"]) for c in clips]
    width = max(width, *map(len, texts))
    suffix = np.array([t + [PAD] * (width - len(t)) for t in texts], np.int32)
    mask = np.array([[1] * len(t) + [0] * (width - len(t)) for t in texts], np.int32)
    return wave, lengths, prefix, suffix, mask


@pytest.fixture(scope="module")
def golden_run(golden, converted):
    module, variables, _ = converted
    batch = _batch(golden["clips"])
    out = _forward(module)(variables, *batch, _scale())
    return batch, jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def golden_answers(golden, converted):
    """`answer` with beam 4 and greedy, compiled together (one encoder). Clip 1's prompt is 2
    tokens shorter than clip 0's: the prompts are left-padded."""
    module, variables, _ = converted
    batch = _batch(golden["clips"], "gen_p_after", with_target=False)

    def both(v, *args):
        return [answer(module, v, *args, eos_token_id=EOS, pad_token_id=PAD, num_beams=beams,
                       max_new_tokens=NEW_TOKENS).tokens for beams in (4, 1)]

    beam4, greedy = jax.jit(both)(variables, *batch)
    return batch, {4: np.asarray(beam4), 1: np.asarray(greedy)}


# ---- parity with the original ---------------------------------------------------------------

def test_audio_embeddings_logits_and_loss_match_the_original(golden, converted, golden_run):
    module, _, config = converted
    vocab = golden["llama_config"]["vocab_size"]
    assert config["kwargs"]["llm"]["vocab_size"] == vocab and module.tokens_per_chunk() == 88
    assert config["source_tensors"] == sum(map(len, golden["parts"].values()))
    (wave, lengths, prefix, suffix, suffix_mask), (audio, audio_mask, _, _, logits) = golden_run
    chex.assert_shape(logits, (2, prefix.shape[1] + 88 + suffix.shape[1], vocab))
    assert audio_mask.all()
    losses = []
    for i, c in enumerate(golden["clips"]):
        _assert_close(audio[i], c["audio_embeds"], f"clip {i} audio embeddings vs original encode_speech")
        pos = c["logits_positions"]  # from the last audio position to the end of the clip's text
        real = len(c["logsumexp"])
        assert pos[-1] == real - 1 and real == prefix.shape[1] + 88 + suffix_mask[i].sum()
        _assert_close(logits[i, pos], c["logits"][:, :vocab], f"clip {i} LLM logits vs original")
        _assert_close(_logsumexp(logits[i, :real]), c["logsumexp"], f"clip {i} logsumexp over the vocabulary, "
                      "every position")

        # The labels: what build_sequence makes of the original's pieces is the original's targets.
        ids, mask, labels = build_sequence(c["p_after"], c["target"][:-1], None, EOS, suffix.shape[1], PAD)
        np.testing.assert_array_equal(ids, suffix[i])
        np.testing.assert_array_equal(mask, suffix_mask[i])
        np.testing.assert_array_equal(labels[:mask.sum()], c["labels"][-mask.sum():])
        loss, count = _text_loss(logits[i:i + 1], labels[None])
        assert int(count) == len(c["target"])
        want = _cross_entropy(c["logits"][:, :vocab], c["labels"][pos])
        _assert_close(loss, want, f"clip {i} loss vs the original's logits without its [PAD] column")
        full = _cross_entropy(np.concatenate([logits[i, pos], c["logits"][:, vocab:]], axis=-1), c["labels"][pos])
        _assert_close(full, c["loss"], f"clip {i} our logits + the original's [PAD] column vs its forward loss")
        losses.append((full, len(c["target"])))
    assert abs(losses[0][0] - losses[1][0]) > 0.1 and float(np.std(logits)) > 0.5  # not degenerate

    # Both clips in one batch: clip 0 (the longer) is unchanged in the original; clip 1's
    # BEATs input is zero-padded, so the original's batch loss is not the per-clip one.
    g = golden["g"]
    assert g["batch2/audio_embeds_err"][0] < 1e-5 < 1e-2 < g["batch2/audio_embeds_err"][1]
    per_clip = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert abs(per_clip - float(g["batch2/loss"])) > 1e-2, "the original's batch loss should differ (clip 1)"


def _hypothesis_scores(module, variables, clip, hypotheses, width):
    """Sum of log-probabilities of each generated sequence after clip's decoding prompt (the
    text padded to `width`, the golden forward's, to share its compile)."""
    texts = [dict(clip, target=np.array(h, np.int32)) for h in hypotheses]
    wave, lengths, prefix, suffix, mask = _batch(texts, "gen_p_after", width=width)
    logits = _forward(module)(variables, wave, lengths, prefix, suffix, mask, _scale())[-1]
    logp = np.asarray(logits, np.float64) - _logsumexp(logits)[..., None]
    start = prefix.shape[1] + module.tokens_per_chunk() + len(clip["gen_p_after"])
    return [float(sum(logp[b, start - 1 + t, tok] for t, tok in enumerate(h))) for b, h in enumerate(hypotheses)]


@pytest.mark.parametrize("num_beams", [4, 1], ids=["beam4", "greedy"])
def test_answer_matches_the_original_generate(golden, converted, golden_run, golden_answers, num_beams):
    """The prompts are left-padded (clip 1's is shorter); each row must give what the original
    gives for its clip alone."""
    module, variables, _ = converted
    clips = golden["clips"]
    (_, _, _, _, mask), tokens = golden_answers[0], golden_answers[1][num_beams]
    assert not mask[1, :2].any() and mask[1, 2:].all() and mask[0].all()
    chex.assert_shape(tokens, (2, NEW_TOKENS))
    key = "generate_beam4" if num_beams == 4 else "generate_greedy"
    for i, c in enumerate(clips):
        want = list(c[key])
        assert want[0] == BOS  # transformers 4.28's placeholder for inputs_embeds, not generated
        want = want[1:]
        got = list(tokens[i])
        if (i, num_beams) not in CUT_HYPOTHESIS:
            assert got == want + [PAD] * (NEW_TOKENS - len(want)), f"clip {i}: {got} vs original {want}"
            continue
        # The original keeps a hypothesis cut at NEW_TOKENS; ours ends with EOS earlier.
        n = got.index(EOS) + 1
        assert len(want) == NEW_TOKENS and EOS not in want and n < NEW_TOKENS
        cut, ended = _hypothesis_scores(module, variables, c, [want, got[:n]], golden_run[0][3].shape[1])
        assert cut / (NEW_TOKENS + 1) > ended / n > cut / NEW_TOKENS, (cut, ended, n)


# ---- shapes, chunks, padding ----------------------------------------------------------------

def test_shapes_with_and_without_jit(converted, golden_run):
    module, variables, config = converted
    (wave, lengths, prefix, suffix, suffix_mask), (audio, audio_mask, x, x_mask, logits) = golden_run
    width, vocab, n = module.parts()[3].hidden_size, module.parts()[3].vocab_size, module.tokens_per_chunk()
    seq = prefix.shape[1] + n + suffix.shape[1]
    chex.assert_shape([audio, audio_mask, x, x_mask, logits], [(2, n, width), (2, n), (2, seq, width), (2, seq),
                                                               (2, seq, vocab)])
    chex.assert_type([logits, x_mask, audio_mask], [jnp.float32, jnp.int32, jnp.bool_])
    np.testing.assert_array_equal(x_mask, np.concatenate([np.ones_like(prefix), audio_mask, suffix_mask], 1))
    # Without jit: the same program traced abstractly, and the text embedding run eagerly.
    abstract = jax.eval_shape(lambda v: module.apply(v, wave, lengths, prefix, suffix, suffix_mask), variables)
    chex.assert_shape(abstract, logits.shape)
    eager = module.apply(variables, prefix, method=Salmonn.embed_text)
    chex.assert_trees_all_close(eager, x[:, :prefix.shape[1]], atol=0)
    # tokens_per_chunk is the count encode_audio makes, for other chunk lengths too.
    for seconds in (1.0, 2.5):
        other = module.clone(chunk_seconds=seconds)
        shape = jax.eval_shape(lambda v: other.apply(v, wave[:1], method=Salmonn.encode_audio), variables)[0].shape
        assert shape == (1, other.num_chunks(wave.shape[1]) * other.tokens_per_chunk(), width), (seconds, shape)
    assert module.clone(chunk_seconds=1.0).tokens_per_chunk() == 2  # 50 frames: 2 windows of 17
    # Every parameter has logical axes.
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), *build(config["kwargs"])[1])["params"]
    names = {rule[0] for rule in DEFAULT_RULES}
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned))[0]
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned) and set(leaf.names) <= names, jax.tree_util.keystr(path)
    chex.assert_trees_all_equal_shapes(nn.unbox(boxed), variables["params"])


def test_chunks(golden, converted, golden_run):
    """A 32 s clip is 2 chunks of 30 s: its audio embeddings are those of its two pieces
    encoded alone; batched with a 1-chunk clip, that clip's second chunk is masked (zero
    embeddings) and its text's logits are those of the clip run alone."""
    module, variables, _ = converted
    n = module.tokens_per_chunk()
    rng = np.random.default_rng(7)
    t = np.arange(32 * SR) / SR
    long = (0.2 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    short = golden["clips"][1]
    batch = _batch([short, dict(golden["clips"][0], wave=long)])
    audio, audio_mask, _, _, logits = map(np.asarray, _forward(module)(variables, *batch, _scale()))
    chex.assert_shape(logits, (2, batch[2].shape[1] + 2 * n + batch[3].shape[1], logits.shape[-1]))
    np.testing.assert_array_equal(audio_mask, [[True] * n + [False] * n, [True] * 2 * n])
    assert not audio[0, n:].any() and np.abs(audio[1, n:]).min() > 0

    (_, _, _, g_suffix, _), (g_audio, _, _, _, g_logits) = golden_run
    _assert_close(audio[0, :n], g_audio[1], "1-chunk clip in a 2-chunk batch vs alone: audio", 1e-5)
    text = g_suffix.shape[1]
    _assert_close(logits[0, -text:], g_logits[1, -text:], "1-chunk clip in a 2-chunk batch vs alone: text logits",
                  1e-5)

    chunk = module.chunk_samples
    pieces = np.zeros_like(batch[0])
    pieces[0, :chunk], pieces[1, :long.size - chunk] = long[:chunk], long[chunk:]
    piece_audio = np.asarray(_forward(module)(variables, pieces, np.array([chunk, long.size - chunk], np.int32),
                                              *batch[2:], _scale())[0])
    _assert_close(audio[1], np.concatenate([piece_audio[0, :n], piece_audio[1, :n]]),
                  "2-chunk clip vs its chunks encoded alone", 1e-5)


def test_beats_padding_is_exact(golden, converted):
    """BEATs on a clip zero-padded past its end, with `clip_token_padding`, gives at the
    clip's tokens what BEATs gives on the clip alone (what the original runs per clip)."""
    module, variables, _ = converted
    beats = module.parts()[1]
    v = {"params": variables["params"]["beats"]}
    clip = golden["clips"][1]["wave"]
    padded = np.pad(clip, (0, 2 * SR - clip.size))[None]
    mask = clip_token_padding(jnp.array([clip.size]), beats_tokens(padded.shape[1]))
    (alone, pad_alone), (features, pad) = jax.jit(lambda v, w, p, m: (beats.apply(v, w), beats.apply(
        v, p, token_padding=m)))(v, clip[None], padded, mask)
    real = beats_tokens(clip.size)
    assert alone.shape[1] == real < features.shape[1] and not np.asarray(pad_alone).any()
    np.testing.assert_array_equal(np.asarray(pad)[0], np.arange(features.shape[1]) >= real)
    _assert_close(features[0, :real], alone[0], "BEATs: padded clip with clip_token_padding vs the clip alone",
                  1e-5)


# ---- training and decoding behaviour --------------------------------------------------------

def _moved(grads) -> set[str]:
    return {k for k, g in flatten(grads).items() if np.abs(np.asarray(g)).max() > 0}


def test_gradients_reach_only_the_connector_and_lora(converted, golden_run):
    """The default freeze flags stop every gradient into Whisper and BEATs; the optimizer's
    trainable pattern (configs/salmonn.py) is the connector and LoRA, which all get one;
    `freeze_whisper=False` lets Whisper's through (training mode, dropout on). 1 s chunks
    (2 per clip) keep the run small."""
    module, variables, _ = converted
    module = module.clone(chunk_seconds=1.0)
    params = variables["params"]
    (wave, lengths, prefix, suffix, suffix_mask), _ = golden_run
    labels = np.where(suffix_mask == 1, suffix, IGNORE)  # any labelled text will do
    trainable = {k for k, t in flatten(trainable_mask(base_config(None, {}, "salmonn").optim, params)).items() if t}
    assert trainable == {k for k in flatten(params) if k.startswith("connector/") or "/lora_" in k}

    def encoders_default(enc):  # stop_gradient: XLA prunes the encoders, a cheap compile
        audio = module.apply({"params": {**params, **enc}}, wave, lengths, method=Salmonn.encode_audio)[0]
        return jnp.sum(audio ** 2)

    def loss_thawed(p):  # differentiate the trained parts and the encoders, not the LLM's base
        full = unflatten({**flatten(params), **flatten(p)})
        logits = module.clone(freeze_whisper=False).apply(
            {"params": full}, wave, lengths, prefix, suffix, suffix_mask, deterministic=False,
            rngs={"dropout": jax.random.PRNGKey(1)})
        return text_loss(logits, labels)[0]

    enc = {k: params[k] for k in ("whisper", "beats")}
    trained = {k: v for k, v in flatten(params).items() if k in trainable or k.startswith(("whisper/", "beats/"))}
    default, thawed = jax.jit(lambda e, p: (jax.grad(encoders_default)(e), jax.grad(loss_thawed)(p)))(
        enc, unflatten(trained))
    assert not _moved(default), sorted(_moved(default))
    moved = _moved(thawed)
    assert {k for k in flatten(params) if k.startswith("whisper/")} <= moved
    assert not {k for k in moved if k.startswith("beats/")}  # freeze_beats is still on
    # With one query per window, self-attention weights are 1 whatever the query and key
    # projections: they get no gradient (in the original too).
    constant = {k for k in trainable if re.search(r"speech_qformer/layers_\d+/attention/(query|key)/", k)}
    assert len(constant) == 2 * 2 * 2 and not constant & moved
    assert trainable - constant <= moved, sorted(trainable - constant - moved)


def test_lora_scale(converted, golden_run):
    """Scale 0 is the LLM without adapters; a discounted scale (activation tuning) moves the
    logits. Scales are per example: clip 0 at 0, clip 1 at 2 (alpha / rank is 4)."""
    module, variables, _ = converted
    batch, (_, _, x, mask, logits) = golden_run
    scaled = np.asarray(_forward(module)(variables, *batch, _scale(0.0, 2.0))[-1])
    llm = module.parts()[3]
    base = {k: v for k, v in flatten(variables["params"]["llm"]).items() if "/lora_" not in k}
    plain = np.asarray(jax.jit(lambda p, x, m: llm.apply({"params": p}, inputs_embeds=x, attention_mask=m))(
        unflatten(base), x, mask))
    _assert_close(scaled[0], plain[0], "lora_scale 0 vs the LLM without adapters", 1e-5)
    assert _max_err(scaled[0], logits[0]) > 1e-2  # the adapters matter at the full scale
    assert _max_err(scaled[1], logits[1]) > 1e-2 and _max_err(scaled[1], plain[1]) > 1e-2
