"""Text metrics of SALMONN's tasks: WER / CER (jiwer), BLEU (sacrebleu), accuracy.

Rules:
- WER, CER and accuracy compare Whisper-normalised text (`normalize`): lower case, no
  punctuation, spelled-out numbers as digits, contractions expanded ("Hello, World!" ==
  "hello world", "twenty-five" == "25", "can't" == "can not"). CER counts spaces as
  characters. Scores are corpus-level (total edits / total reference words).
- A pair whose reference is empty after normalisation has no words to score: it is
  skipped (and the count logged); with no pair left the score is NaN.
- Phone recognition uses PER: WER on the text as written, since the English normaliser
  would rewrite phones ("AH0" -> "ah 0", "OW1" -> "ow one").
- BLEU is sacrebleu's corpus BLEU (0-100) on the raw text, tokenizer "13a"; "zh" for
  Chinese targets, "char" for Japanese (MeCab is not a dependency here).
- Accuracy: a hypothesis is right if, normalised, it equals the normalised reference or
  begins with the reference's words ("Male." and "male speaker" both match "male").
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence

import jiwer
import sacrebleu

_LOG = logging.getLogger(__name__)

DEFAULT_METRIC = "accuracy"
TASK_METRICS = {
    "asr": "wer",
    "asr_de": "wer",
    "asr_zh": "cer",
    "phone_recognition": "per",
    "lyrics_recognition": "wer",
    "speech_separation": "wer",
    "speaker_diarization_asr": "wer",
    "translation_ec": "bleu_zh",
    "translation_en2de": "bleu",
    "translation_en2ja": "bleu_ja",
    "audiocaption": "bleu",
    "audiocaption_v2": "bleu",
    "music_description": "bleu",
    "gender_recognition": "accuracy",
    "emotion_recognition": "accuracy",
    "speaker_verification": "accuracy",
    "QA": "accuracy",
}
# Normaliser language of tasks whose references are not English.
TASK_LANGUAGES = {"asr_de": "de", "asr_zh": "zh"}
_BLEU_TOKENIZE = {"bleu": "13a", "bleu_zh": "zh", "bleu_ja": "char"}
_PERCENT_OF_FRACTION = ("wer", "cer", "per", "accuracy")


@functools.lru_cache(maxsize=None)
def _normalizer(english: bool):
    # whisper_normalizer reads its spelling table on construction: build each one once.
    if english:
        from whisper_normalizer.english import EnglishTextNormalizer
        return EnglishTextNormalizer()
    from whisper_normalizer.basic import BasicTextNormalizer
    return BasicTextNormalizer()


def normalize(text: str, language: str = "en") -> str:
    """Whisper's normalisation: the English normaliser for "en*", the basic one otherwise."""
    return _normalizer(language.lower().startswith("en"))(text).strip()


def _pairs(references: Sequence, hypotheses: Sequence[str]) -> tuple[list, list[str]]:
    references, hypotheses = list(references), list(hypotheses)
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    return references, hypotheses


def _error_rate(measure, references, hypotheses, normalized: bool, language: str) -> float:
    refs, hyps = _pairs(references, hypotheses)
    if normalized:
        refs = [normalize(r, language) for r in refs]
        hyps = [normalize(h, language) for h in hyps]
    kept = [(r, h) for r, h in zip(refs, hyps) if r.strip()]
    if len(kept) < len(refs):
        _LOG.warning("%d of %d pairs skipped: empty reference%s", len(refs) - len(kept),
                     len(refs), " after normalisation" if normalized else "")
    if not kept:
        return math.nan
    return float(measure([r for r, _ in kept], [h for _, h in kept]))


def wer(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True,
        language: str = "en") -> float:
    """Corpus word error rate (a fraction; pairs with an empty reference skipped)."""
    return _error_rate(jiwer.wer, references, hypotheses, normalize, language)


def cer(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True,
        language: str = "en") -> float:
    """Corpus character error rate (a fraction; spaces count; empty references skipped)."""
    return _error_rate(jiwer.cer, references, hypotheses, normalize, language)


def bleu(references: Sequence[str | Sequence[str]], hypotheses: Sequence[str],
         tokenize: str = "13a", lowercase: bool = False) -> float:
    """sacrebleu corpus BLEU, 0-100.

    Args:
        references: one reference string per hypothesis, or a list of references each
            (their counts may differ).
        tokenize: "13a" (default), "zh" for Chinese, "char", ... (sacrebleu's names).
    """
    refs, hyps = _pairs(references, hypotheses)
    if not hyps:
        return math.nan
    refs = [[r] if isinstance(r, str) else list(r) for r in refs]
    streams = [[r[k] if k < len(r) else None for r in refs]
               for k in range(max(len(r) for r in refs))]
    return float(sacrebleu.corpus_bleu(hyps, streams, tokenize=tokenize,
                                       lowercase=lowercase).score)


def accuracy(references: Sequence[str], hypotheses: Sequence[str],
             language: str = "en") -> float:
    """Fraction of hypotheses that, normalised, equal or begin with their reference."""
    refs, hyps = _pairs(references, hypotheses)
    if not refs:
        return math.nan
    hits = 0
    for ref, hyp in zip(refs, hyps):
        ref_words, hyp_words = normalize(ref, language).split(), normalize(hyp, language).split()
        hits += hyp_words[:len(ref_words)] == ref_words if ref_words else not hyp_words
    return hits / len(refs)


def score(metric: str, references: Sequence[str], hypotheses: Sequence[str],
          language: str = "en") -> float:
    """One metric by name: "wer", "cer", "per", "bleu", "bleu_zh", "bleu_ja", "accuracy"."""
    if metric in ("wer", "cer"):
        return (wer if metric == "wer" else cer)(references, hypotheses, language=language)
    if metric == "per":
        return wer(references, hypotheses, normalize=False)
    if metric in _BLEU_TOKENIZE:
        return bleu(references, hypotheses, tokenize=_BLEU_TOKENIZE[metric])
    if metric == "accuracy":
        return accuracy(references, hypotheses, language)
    raise ValueError(f"unknown metric {metric!r}; known: wer, cer, per, "
                     f"{', '.join(_BLEU_TOKENIZE)}, accuracy")


def score_by_task(items: Sequence[Mapping], hypotheses: Sequence[str]) -> dict[str, float]:
    """Scores hypotheses per task with `TASK_METRICS` (unknown tasks: `DEFAULT_METRIC`).

    Args:
        items: annotation items with "task" and "text" (the reference).
        hypotheses: one decoded string per item.

    Returns:
        {"<task>/<metric>": score, "<task>/n": item count} for every task present; WER,
        CER, PER and accuracy as fractions, BLEU 0-100.
    """
    items, hypotheses = _pairs(items, hypotheses)
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item["task"], []).append(i)
    out: dict[str, float] = {}
    for task, idx in groups.items():
        metric = TASK_METRICS.get(task, DEFAULT_METRIC)
        out[f"{task}/{metric}"] = score(metric, [items[i]["text"] for i in idx],
                                        [hypotheses[i] for i in idx],
                                        TASK_LANGUAGES.get(task, "en"))
        out[f"{task}/n"] = len(idx)
    return out


def format_table(metrics: Mapping[str, float]) -> str:
    """`score_by_task`'s result as an aligned table, every score in percent."""
    rows = [("task", "metric", "%", "n")]
    for key in sorted(k for k in metrics if not k.endswith("/n")):
        task, metric = key.rsplit("/", 1)
        value = metrics[key]
        if metric in _PERCENT_OF_FRACTION:
            value *= 100
        n = metrics.get(f"{task}/n")
        rows.append((task, metric, f"{value:.2f}", "" if n is None else str(int(n))))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  "
             f"{r[3]:>{widths[3]}}" for r in rows]
    return "\n".join(lines)
