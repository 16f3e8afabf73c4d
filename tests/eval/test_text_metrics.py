"""SALMONN text metrics (jaxaudio.eval.text_metrics) on hand-computed examples, with
sacrebleu as the independent reference for BLEU."""

import logging
import math

import pytest
import sacrebleu

from jaxaudio.eval import text_metrics as tm


def test_normalize():
    assert tm.normalize("Hello, World!") == "hello world"
    assert tm.normalize("I can't go.") == "i can not go"
    assert tm.normalize("It costs twenty-five dollars") == "it costs $25"
    assert tm.normalize("Mr. Smith") == "mister smith"
    assert tm.normalize("Größe, Welt!", language="de") == "größe welt"  # basic normaliser


def test_wer_hand_computed():
    # sat->sit (substitution), the (deletion), down (insertion): 3 errors / 6 words.
    assert tm.wer(["the cat sat on the mat"], ["the cat sit on mat down"]) == 0.5
    # Corpus level: (1 substitution + 1 insertion) / (4 + 2) reference words.
    assert tm.wer(["a b c d", "e f"], ["a x c d", "e f g"]) == pytest.approx(1 / 3)
    assert tm.wer(["one two three"], [""]) == 1.0  # all deleted
    assert tm.wer(["Hello, World!"], ["hello world"]) == 0.0
    assert tm.wer(["Hello, World!"], ["hello world"], normalize=False) == 1.0
    # The Whisper normaliser's numbers and contractions.
    assert tm.wer(["It costs twenty-five dollars."], ["it costs $25"]) == 0.0
    assert tm.wer(["I can't go"], ["i can not go"]) == 0.0
    assert tm.wer(["seven robots walk quietly"], ["7 robots walk quietly"]) == 0.0


def test_cer_hand_computed():
    assert tm.cer(["abcd"], ["abxd"]) == 0.25
    assert tm.cer(["hello world"], ["hello word"]) == pytest.approx(1 / 11)  # space counts
    assert tm.cer(["Hello, World!"], ["hello world"]) == 0.0


def test_empty_references_skipped(caplog):
    # "uh" is a filler the English normaliser removes: that pair has nothing to score.
    with caplog.at_level(logging.WARNING, logger=tm.__name__):
        assert tm.wer(["uh", "a b"], ["anything", "a c"]) == 0.5
    assert "1 of 2 pairs skipped" in caplog.text
    assert math.isnan(tm.wer(["uh"], ["x"]))
    assert math.isnan(tm.wer([], []))
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        tm.wer(["a", "b"], ["a"])


def test_bleu_matches_sacrebleu():
    refs = ["a dog barks loudly in the distance", "rain falls on a tin roof",
            "a bell rings twice", "an engine idles then a siren wails"]
    hyps = ["a dog is barking in the distance", "rain falls on the roof",
            "a bell rings", "an engine hums and a siren wails"]
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert 0 < expected < 100
    assert tm.bleu(refs, hyps) == pytest.approx(expected, abs=1e-9)
    assert tm.bleu(refs, refs) == pytest.approx(100.0)
    upper, lower = ["A Bell rings out twice"], ["a bell rings out twice"]
    assert tm.bleu(upper, lower, lowercase=True) == pytest.approx(100.0)
    # Several references per hypothesis, their counts differing.
    multi = [[r, "something else entirely"] for r in refs[:2]] + [[r] for r in refs[2:]]
    expected_multi = sacrebleu.corpus_bleu(
        hyps, [refs, ["something else entirely"] * 2 + [None, None]]).score
    assert tm.bleu(multi, hyps) == pytest.approx(expected_multi, abs=1e-9)
    zh_refs, zh_hyps = ["我们今天去公园散步", "天气很好"], ["我们今天去公园", "天气非常好"]
    assert tm.bleu(zh_refs, zh_hyps, tokenize="zh") == pytest.approx(
        sacrebleu.corpus_bleu(zh_hyps, [zh_refs], tokenize="zh").score, abs=1e-9)


def test_accuracy_rules():
    refs = ["male", "female", "two", "white noise", "yes", "bell"]
    hyps = ["Male.",               # normalised exact match
            "male",                # wrong
            "2 sounds",            # starts with the reference ("two" -> "2")
            "white noise hisses",  # starts with the two reference words
            "no",                  # wrong
            "a bell"]              # does not start with the reference
    assert tm.accuracy(refs, hyps) == 0.5
    assert tm.accuracy(["female"], ["female speaker"]) == 1.0
    assert tm.accuracy(["white noise"], ["white"]) == 0.0
    assert math.isnan(tm.accuracy([], []))


def test_score_by_task_and_table():
    items = [
        {"task": "asr", "text": "the red dog runs"},
        {"task": "asr", "text": "two cats sleep"},
        {"task": "gender_recognition", "text": "female"},
        {"task": "gender_recognition", "text": "male"},
        {"task": "audiocaption", "text": "a bell rings out twice"},
        {"task": "mystery_task", "text": "yes"},
        {"task": "phone_recognition", "text": "HH AH0 L OW1"},
    ]
    hyps = ["The red dog runs.", "2 cats sleeping", "Female.", "female",
            "a bell rings out twice", "Yes!", "HH AH0 L OW0"]
    out = tm.score_by_task(items, hyps)
    assert out["asr/wer"] == pytest.approx(1 / 7)  # one substitution in 7 words
    assert out["asr/n"] == 2
    assert out["gender_recognition/accuracy"] == 0.5
    assert out["audiocaption/bleu"] == pytest.approx(100.0)
    assert out["mystery_task/accuracy"] == 1.0  # unknown tasks: DEFAULT_METRIC
    assert out["phone_recognition/per"] == 0.25  # phones compared as written
    assert set(out) == {f"{t}/{m}" for t, m in [
        ("asr", "wer"), ("asr", "n"), ("gender_recognition", "accuracy"),
        ("gender_recognition", "n"), ("audiocaption", "bleu"), ("audiocaption", "n"),
        ("mystery_task", "accuracy"), ("mystery_task", "n"), ("phone_recognition", "per"),
        ("phone_recognition", "n")]}
    assert tm.TASK_METRICS["translation_ec"] == "bleu_zh"
    assert tm.TASK_METRICS.get("audio_story_telling", tm.DEFAULT_METRIC) == "accuracy"

    lines = tm.format_table(out).splitlines()
    assert lines[0].split() == ["task", "metric", "%", "n"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["asr"] == ["wer", "14.29", "2"]
    assert rows["audiocaption"] == ["bleu", "100.00", "1"]
    assert rows["gender_recognition"] == ["accuracy", "50.00", "2"]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    with pytest.raises(ValueError, match="unknown metric"):
        tm.score("meteor", ["a"], ["a"])
