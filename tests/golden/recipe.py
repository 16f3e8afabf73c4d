"""Deterministic synthetic weights for the Spatial-AST golden test (pure numpy).

`recipe_state_dict(keys, shapes, seed)` builds a PyTorch-style state dict
(name -> numpy array) for the given parameter names and shapes.  The golden
file ``spatial_ast_depth2.npz`` next to this module was produced by loading
exactly this state dict (seed 0) into the ORIGINAL Spatial-AST PyTorch model
and recording its outputs, so a port can rebuild identical weights from the
``keys``/``shapes``/``seed`` arrays stored in the npz without shipping a
checkpoint.

Rules, applied while iterating ``keys`` in the given order with a single
``np.random.default_rng(seed)`` (keys that draw nothing do not advance it):

* ``spectrogram_extractor.conv_real.weight``, ``spectrogram_extractor.conv_imag.weight``,
  ``logmel_extractor.melW`` (frozen front-end buffers): skipped, i.e. ABSENT from the
  result; the model's own deterministic values (DFT kernels x periodic Hann window,
  librosa Slaney mel filterbank) are used instead.
* ``*num_batches_tracked`` -> int64 zeros (no draw).
* ``bn.running_mean`` / ``bn.running_var`` (the affine-free BatchNorm2d(2) applied to
  the dB log-mel) -> ``rng.normal(-20.0, 2.0, shape)`` / ``rng.uniform(5.0, 15.0, shape)``.
  These two keys get data-scale statistics (the log-mel of the golden input is about
  -20 dB with std ~3.5) so that the normalised log-mel is O(1).  With the generic
  rules below (mean ~N(0, 0.5), var ~U(0.5, 1.5)) the normalised input sits near
  -20, the stem's GELU saturates and 99.4% of the stem output is ~0, making the
  golden outputs almost insensitive to the audio (swapping the ears changed the
  azimuth logits by at most 0.07; with this rule, by 3.1).
* ``*running_var``  -> ``rng.uniform(0.5, 1.5, shape)``.
* ``*running_mean`` -> ``rng.normal(0.0, 0.5, shape)``.
* ``cls_tokens``, ``pos_embed`` -> ``0.02 * rng.standard_normal(shape)`` (pos_embed is
  random on purpose: the port must LOAD it, not recompute the sin-cos table).
* 1-D ``*.weight`` whose name contains ``norm`` or ``conv_downsample.1`` (LayerNorm /
  BatchNorm scale) -> ``1 + 0.1 * rng.standard_normal(shape)``.
* 1-D ``*.bias`` -> ``0.02 * rng.standard_normal(shape)``.
* any other weight -> ``rng.standard_normal(shape) / sqrt(fan_in)`` with
  ``fan_in = prod(shape[1:])`` (PyTorch (out, in, ...) layout), which keeps
  activations O(1) through the blocks.

Draws are float64 and cast to float32 (num_batches_tracked stays int64).

How ``spatial_ast_depth2.npz`` was made
---------------------------------------
* Original code: https://github.com/zszheng147/Spatial-AST at commit
  a5638035e9a4dd3da3d4a23873af719062710586 (a563803, HEAD of the local mirror),
  exported with
  ``git -C /work/.mirror/zszheng147+Spatial-AST/repo archive HEAD | tar -x -C /work/golden_src``.
  The original code is NOT part of this repository, and no original file was edited.
* Generator: ``/work/golden_src/make_golden.py`` (outside this repository), run as
  ``cd /work/golden_src && python make_golden.py`` with torch 2.13.0+cpu, timm 1.0.31,
  librosa 0.11.0, numpy 2.4.6, scipy 1.17.1, CPU float32, ``torch.set_num_threads(2)``.
  Import shims (sys.modules only): a stub ``torchaudio`` whose
  ``functional.fftconvolve(x, y, mode='full')`` is an rfft/irfft linear convolution
  along the last axis with broadcasting (checked against ``scipy.signal.fftconvolve``)
  and whose ``transforms.TimeMasking/FrequencyMasking`` are identity modules (train
  only); and ``timm.models.layers`` exposing the installed timm's own
  ``to_2tuple``/``DropPath``/``trunc_normal_`` (loaded from ``timm/layers/helpers.py``,
  ``drop.py``, ``weight_init.py`` without running ``timm/__init__``, because the
  installed torchvision cannot load next to torch 2.13.0+cpu).
* Model: ``build_AST(num_classes=355, drop_rate=0., drop_path_rate=0.)`` (embed 768,
  12 heads, qkv_bias, LayerNorm eps 1e-6), then ``del model.blocks[2:]`` to get
  depth 2 (``build_AST`` hard-codes ``depth=12``, so ``build_AST(depth=2)`` raises a
  duplicate-keyword TypeError).  Weights: ``recipe_state_dict(keys, shapes, seed=0)``
  merged with the model's own three front-end buffers, loaded with
  ``load_state_dict(strict=True)``; ``model.eval()``; forward
  ``model(waveform, rir)`` with the default ``mask_t_prob = mask_f_prob = 0``.
* Inputs (seed 1234 via ``np.random.default_rng``): ``waveform`` [2, 1, 128000]
  (4 s at 32 kHz; 0.06 x linear sine sweep (100->8000 Hz, 3000->300 Hz) plus
  0.02 x white noise) and ``rir``
  [2, 2, 64000] (per ear: a direct-path impulse at a per-ear delay/gain plus an
  exponentially decaying noise tail), both stored as float16 and fed to the model
  as ``torch.from_numpy(x.astype(np.float32))``.
* Intermediates were captured with forward hooks on the original modules (and a
  pass-through wrapper on ``torch.nn.functional.interpolate``), i.e. from the
  original forward itself (eval mode, float32).

Arrays in the npz (float32 unless noted; B = 2):

* ``keys`` (str [54], state-dict order, incl. the 3 frozen front-end keys),
  ``shapes`` (int64 [54, 4], padded with -1; see `decode_shapes`), ``seed`` (0),
  ``input_seed`` (1234), ``depth`` (2) -- all int64 scalars.
* ``waveform`` float16 [B, 1, 128000], ``rir`` float16 [B, 2, 64000]: the inputs.
* ``binaural_head`` [B, 2, 8000]: first 8000 samples of the binaural signal the model
  fed to the STFT (``fftconvolve(waveform, rir)[..., :128000]``);
  ``binaural_mean``/``binaural_std`` [B, 2]: per-channel stats over all 128000 samples.
* ``frontend`` [B, 4, 401, 128]: stacked [BN(logmel_L), BN(logmel_R), cosIPD@melW,
  sinIPD@melW] before the time resize.
* ``resized_rows`` int64 [94] and ``resized_sel`` [B, 4, 94, 128]: rows
  ``resized_rows`` of the bicubic (align_corners) 401 -> 1024 resize;
  ``resized_mean``/``resized_std``: scalars over the full [B, 4, 1024, 128] tensor.
* ``stem_head`` [B, 1, 64, 128]: ``conv_downsample`` output, first 64 frames;
  ``stem_mean``/``stem_std``: scalars over the full [B, 1, 1024, 128] output.
* ``tokens_head`` [B, 8, 768]: output of the last block, first 8 tokens (3 CLS + 5
  patches); ``tokens_token_mean`` [B, 515]: its mean over channels for every token.
* ``classifier`` [B, 355], ``distance`` [B, 21], ``azimuth`` [B, 360],
  ``elevation`` [B, 180]: the model outputs (logits).

float32-vs-float64 run of the same original forward (a scale for tolerances): max abs
difference 7e-4 on ``frontend`` (values up to ~12; the dB log-mel), 4e-5 on the stem,
8e-5 on the tokens, 1.3e-5 on the logits (values up to ~3.3).
"""

from __future__ import annotations

from typing import Dict, Iterable, Sequence

import numpy as np

__all__ = ["FROZEN_FRONTEND_KEYS", "recipe_state_dict", "decode_shapes", "golden_state_dict"]

#: Buffers the recipe does not randomise (the model's deterministic values are used).
FROZEN_FRONTEND_KEYS = (
    "spectrogram_extractor.conv_real.weight",
    "spectrogram_extractor.conv_imag.weight",
    "logmel_extractor.melW",
)


def _is_norm_scale(key: str) -> bool:
    return "norm" in key or "conv_downsample.1" in key


def recipe_state_dict(
    keys: Iterable[str], shapes: Iterable[Sequence[int]], seed: int
) -> Dict[str, np.ndarray]:
    """Build the synthetic state dict for ``keys``/``shapes`` (see module docstring)."""
    rng = np.random.default_rng(int(seed))
    out: Dict[str, np.ndarray] = {}
    for key, shape in zip(keys, shapes):
        key = str(key)
        shape = tuple(int(s) for s in shape)
        if key in FROZEN_FRONTEND_KEYS:
            continue
        if key.endswith("num_batches_tracked"):
            out[key] = np.zeros(shape, dtype=np.int64)
            continue
        if key == "bn.running_mean":
            val = rng.normal(-20.0, 2.0, size=shape)
        elif key == "bn.running_var":
            val = rng.uniform(5.0, 15.0, size=shape)
        elif key.endswith("running_var"):
            val = rng.uniform(0.5, 1.5, size=shape)
        elif key.endswith("running_mean"):
            val = rng.normal(0.0, 0.5, size=shape)
        elif key in ("cls_tokens", "pos_embed"):
            val = 0.02 * rng.standard_normal(shape)
        elif len(shape) == 1 and key.endswith("weight"):
            if not _is_norm_scale(key):
                raise ValueError(f"unexpected 1-D weight without a rule: {key} {shape}")
            val = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1 and key.endswith("bias"):
            val = 0.02 * rng.standard_normal(shape)
        elif key.endswith("weight") and len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            val = rng.standard_normal(shape) / np.sqrt(fan_in)
        else:
            raise ValueError(f"no recipe rule for {key} {shape}")
        out[key] = np.asarray(val, dtype=np.float32)
    return out


def decode_shapes(shapes: np.ndarray) -> list:
    """Turn the npz's padded int array ``shapes`` [n, 4] (pad = -1) into tuples."""
    return [tuple(int(s) for s in row if s >= 0) for row in np.asarray(shapes)]


def golden_state_dict(npz) -> Dict[str, np.ndarray]:
    """Rebuild the exact weights used for a golden npz (``np.load`` result or path)."""
    if isinstance(npz, (str, bytes)) or hasattr(npz, "__fspath__"):
        npz = np.load(npz)
    return recipe_state_dict(
        [str(k) for k in npz["keys"]], decode_shapes(npz["shapes"]), int(npz["seed"])
    )


# ---------------------------------------------------------------------------------------------
# audiobert_pitch_tiny.npz (tests/models/test_audiobert.py::test_original_pitch_model_golden)
# ---------------------------------------------------------------------------------------------

AUDIOBERT_PITCH_TINY = """How ``audiobert_pitch_tiny.npz`` was made.

* Original code: https://github.com/HJ-Ok/AudioBERT at commit
  4fc71aee2dd209093614d80dcc0b2428f8c51bf2 (4fc71ae, HEAD of the local mirror), exported with
  ``git -C /work/.mirror/HJ-Ok+AudioBERT/repo archive 4fc71ae model/AudioBERT | tar -x -C
  /work/golden_src/audiobert/orig``. Files used, unedited: ``model/AudioBERT/sound_pitch/model.py``
  (``AK_BERT``) and ``model/AudioBERT/sound_pitch/dataloader.py`` (``QA_dataset``,
  ``dynamic_padding_collate_fn``). Nothing of the original is in this repository.
* Generator: ``/work/golden_src/audiobert/make_golden.py`` (outside this repository), run as
  ``cd /work/golden_src/audiobert && python make_golden.py OUT.npz`` with torch 2.13.0+cpu,
  transformers 5.25.0, peft 0.21.2, numpy 2.4.6, librosa 0.11.0, CPU float32,
  ``torch.set_num_threads(2)``; two runs give identical arrays. Patches: none to the original
  files. The sound_pitch files import no Habana module. The hub names are replaced by the
  constructor arguments: ``AK_BERT(language_model_path=<dir>/tiny_bert,
  audio_model_path=<dir>/tiny_ast, tokenizer=..., lora_r=4, lora_alpha=8, lora_dropout=0.01)``.
  Neither path contains "large", so the original's ``Linear(768, 1024)`` is unused and is not
  stored. The torchvision stand-in of ``launch/torch_compat.py`` is installed before
  transformers and peft are imported.
* Tokenizer: ``BertTokenizerFast`` over a 43-entry lower-case WordPiece ``vocab.txt``, stored as
  ``vocab``: [PAD] 0, [UNK], [CLS] 2, [SEP] 3, [MASK] 4, punctuation, then the sentences' words
  including "lower"/"higher" and "##ing"/"##s". ``resize_token_embeddings(len(tokenizer))`` is a
  no-op because the sizes match.
* Weights: ``BertForMaskedLM(BertConfig(vocab 43, hidden 32, 2 layers, 4 heads, intermediate
  64, max_position_embeddings 64, gelu))`` and ``ASTModel(ASTConfig(hidden 32, 2 layers, 4
  heads, intermediate 64, max_length 48, num_mel_bins 32, patch 16, strides 10))``, each with
  every parameter redrawn from ``torch.Generator().manual_seed(1)`` (BERT) and ``(2)`` (AST) as
  ``0.2 * N(0, 1)``, or ``1 + 0.2 * N(0, 1)`` for LayerNorm scales. Both are saved with
  ``save_pretrained`` and loaded by ``AK_BERT`` itself. peft's ``get_peft_model`` runs inside
  ``AK_BERT``, with ``torch.manual_seed(3)`` before the constructor for lora_A. Afterwards
  every ``lora_B`` is set to ``0.2 * N(0, 1)`` from ``torch.Generator().manual_seed(4)``,
  because PEFT starts B at zero. ``model.eval()``.
* Inputs: four pitch rows (sentence, answer, span1, span2) run through the original
  ``QA_dataset``, which lower-cases, builds "[CLS]"+text+"[SEP]" and finds span positions from
  the offsets. Row 3's span2 ("a small tuba") is not in its sentence, so it falls back to the
  last token. Row 4's span1 ("church bell") is not in its sentence, so it falls back to 0.
  ``first_token_pos`` is [[5, 16], [4, 12], [2, 12], [0, 12]]. The batch is then collated by
  ``dynamic_padding_collate_fn`` with ``ASTFeatureExtractor(num_mel_bins=32, max_length=48)``:
  ids are right-padded with 0 to 19, and the padding is attended to because no mask reaches
  BERT. Clips are 16 kHz wav files written with soundfile: ``0.5 sin(2 pi f t)`` plus
  ``0.05 N(0, 1)`` (``np.random.default_rng(10 i + j)``). One clip has 320 samples, which the
  original pads to 500.
* Forward, as trainer.py's ``validate`` calls it: ``model(audio_features_1, audio_features_2,
  first_token_pos, input_ids, targets=labels)`` under ``torch.no_grad()``.

Arrays: ``state/<key>``: the weights. BERT is under the original's ``state_dict()`` names,
``language_enc.base_model.model.bert...`` (``...query.base_layer.weight``,
``...query.lora_A.default.weight``). AST is under ``audio_enc.<key>`` in the transformers
on-disk (``save_pretrained``) layout, taken from ``model.audio_enc.save_pretrained``, because
transformers 5 renames AST's modules in memory; the re-loaded copy gives bit-identical hidden
states. ``bert_config``, ``ast_config`` (config.json texts) and ``lora_config`` (PEFT
adapter_config fields) are JSON strings. ``vocab`` [43]. ``input_ids``, ``attention_mask``,
``labels`` int64 [4, 19]. ``first_token_pos`` int64 [4, 2]. ``audio_1``, ``audio_2`` float32
[4, 48, 32] (the extractor's ``input_values``). ``logits`` [4, 19, 43]. ``loss`` (the
BertForMaskedLM loss with ``labels``). ``predicted_token_id`` [4] (the lower/higher argmax at
[MASK]).

The animal twin (``animal_sound/model.py``) raises NameError at HEAD
(``expanded_mean_audio_embs_1`` is undefined) and was not run. It would be the same path with
one slot.
"""
